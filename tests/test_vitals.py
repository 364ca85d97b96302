"""Vitals: ranges, units, aliases, sex normalisation, missing values; out-of-range is an error, never clipped."""
from __future__ import annotations

import math

import pytest

from models.preprocessing import VITAL_FIELDS, VITAL_RANGES, VitalsError, parse_vitals, vitals_warnings


def test_fields_and_ranges_are_the_contract():
    assert VITAL_FIELDS == ("temperature_c", "spo2_percent", "heart_rate_bpm", "respiratory_rate",
                            "systolic_bp_mmhg", "age_years")
    assert VITAL_RANGES == {"temperature_c": (30, 45), "spo2_percent": (50, 100), "heart_rate_bpm": (20, 250),
                            "respiratory_rate": (4, 80), "systolic_bp_mmhg": (50, 260), "age_years": (0, 120)}


def test_full_record():
    v = parse_vitals({"temperature_c": 38.2, "spo2_percent": "91", "heart_rate_bpm": 104, "respiratory_rate": 22,
                      "systolic_bp_mmhg": 118.0, "age_years": 67, "sex": "female"})
    assert v == {"temperature_c": 38.2, "spo2_percent": 91.0, "heart_rate_bpm": 104.0, "respiratory_rate": 22.0,
                 "systolic_bp_mmhg": 118.0, "age_years": 67.0, "sex": "F"}


@pytest.mark.parametrize("empty", [None, {}])
def test_everything_missing(empty):
    v = parse_vitals(empty)
    assert all(v[f] is None for f in VITAL_FIELDS) and v["sex"] == "unknown"


@pytest.mark.parametrize("missing", [None, "", "  ", "NA", "nan", float("nan")])
def test_missing_markers(missing):
    assert parse_vitals({"heart_rate_bpm": missing})["heart_rate_bpm"] is None


def test_boundaries_inclusive():
    for f, (lo, hi) in VITAL_RANGES.items():
        assert parse_vitals({f: lo})[f] == lo
        assert parse_vitals({f: hi})[f] == hi


@pytest.mark.parametrize(
    "field,value",
    [("temperature_c", 29.9), ("temperature_c", 45.1), ("spo2_percent", 49), ("spo2_percent", 101),
     ("heart_rate_bpm", 19), ("heart_rate_bpm", 251), ("respiratory_rate", 3), ("respiratory_rate", 81),
     ("systolic_bp_mmhg", 49), ("systolic_bp_mmhg", 261), ("age_years", -1), ("age_years", 121)],
)
def test_out_of_range_raises_with_details(field, value):
    with pytest.raises(VitalsError) as exc:
        parse_vitals({field: value})
    err = exc.value
    assert err.field == field and err.value == value
    assert err.valid_range == VITAL_RANGES[field]
    assert "outside the valid range" in err.reason


def test_fahrenheit_only_when_the_unit_says_so():
    assert parse_vitals({"temperature_f": 101.3})["temperature_c"] == pytest.approx(38.5, abs=0.01)
    assert parse_vitals({"temperature_c": {"value": 98.6, "unit": "F"}})["temperature_c"] == pytest.approx(37.0)
    assert parse_vitals({"temperature": {"value": "37.5", "unit": "°C"}})["temperature_c"] == 37.5
    with pytest.raises(VitalsError) as exc:  # a bare 101.3 is °C: out of range, with a hint, never converted
        parse_vitals({"temperature_c": 101.3})
    assert "temperature_f" in exc.value.reason
    with pytest.raises(VitalsError):
        parse_vitals({"temperature_f": 130})  # 54 °C after conversion
    with pytest.raises(VitalsError) as exc:
        parse_vitals({"temperature_c": {"value": 37, "unit": "K"}})
    assert "unit" in exc.value.reason


def test_public_collection_aliases():
    v = parse_vitals({"pO2_saturation": "93.0", "temperature": "38.1", "age": "65.0", "sex": "M"})
    assert v["spo2_percent"] == 93.0 and v["temperature_c"] == 38.1 and v["age_years"] == 65.0 and v["sex"] == "M"
    with pytest.raises(VitalsError) as exc:  # the public collection has pO2 in mmHg in that column sometimes
        parse_vitals({"pO2_saturation": "340.0"})
    assert exc.value.field == "spo2_percent"


def test_conflicting_duplicates_raise():
    assert parse_vitals({"spo2_percent": 95, "pO2_saturation": 95})["spo2_percent"] == 95
    with pytest.raises(VitalsError):
        parse_vitals({"spo2_percent": 95, "pO2_saturation": 88})


@pytest.mark.parametrize(
    "raw,expected",
    [("M", "M"), ("male", "M"), ("F", "F"), ("Female", "F"), ("O", "other"), ("other", "other"),
     ("", "unknown"), (None, "unknown"), ("U", "unknown"), (float("nan"), "unknown")],
)
def test_sex_normalisation(raw, expected):
    assert parse_vitals({"sex": raw})["sex"] == expected


def test_bad_values():
    for bad in [{"sex": "banana"}, {"heart_rate_bpm": "fast"}, {"heart_rate_bpm": True},
                {"respiratory_rate": [12]}, {"age_years": float("inf")}]:
        with pytest.raises(VitalsError):
            parse_vitals(bad)
    with pytest.raises(VitalsError):
        parse_vitals(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_unknown_keys_ignored_unless_strict():
    row = {"filename": "a.dcm", "label": "covid19", "heart_rate_bpm": 80}
    assert parse_vitals(row)["heart_rate_bpm"] == 80
    with pytest.raises(VitalsError) as exc:
        parse_vitals({"spo2": 95, "heartrate": 80}, strict=True)
    assert exc.value.field == "heartrate"


def test_dicom_age_string_and_warnings():
    v = parse_vitals({"age_years": "016Y"})
    assert v["age_years"] == 16
    notes = vitals_warnings(v)
    assert any("under 18" in n for n in notes)
    assert parse_vitals({"age_years": "006M"})["age_years"] == pytest.approx(0.5)
    assert not any("under 18" in n for n in vitals_warnings(parse_vitals({"age_years": 40})))


def test_values_never_clipped():
    v = parse_vitals({"spo2_percent": 100, "temperature_c": 44.99})
    assert v["spo2_percent"] == 100 and math.isclose(v["temperature_c"], 44.99)
