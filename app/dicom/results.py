"""Result objects sent back to the hospital's PACS, built with highdicom.

For each analysed source image two DICOM objects, in the *source study* (same patient and study
identifiers: they go back to the hospital's own PACS), each in a new series of this system:

* a **Comprehensive 3D SR** holding a TID 1500 Measurement Report: the model (name, version,
  approval) as the *device observer*; one TID 1501 measurement group tracking the source image,
  with P(covid19) (DCM 122157 "Probability", UCUM "1") and the operating threshold (DCM 122411
  "Threshold Value") as numeric measurements, the decision at that threshold as a qualitative
  evaluation (SCT 10828004 Positive / 260385009 Negative), the algorithm identification (name,
  version, approval as parameters), a reference to the source image, and TEXT comments: one per
  warning and the not-for-diagnostic-use statement. Completion PARTIAL, verification UNVERIFIED.
* a **secondary capture** (RGB) of the prepared radiograph with the Grad-CAM overlay and a banner
  with P(covid19), the decision, the model and the disclaimer burned in
  (``BurnedInAnnotation = YES``).

UIDs are derived deterministically from the source SOP Instance UID and the model version
(``pydicom.uid.generate_uid(entropy_srcs=...)``), so a resend after a crash or a failed
association replaces the same objects in the PACS instead of duplicating them.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app.dicom.types import DISCLAIMER, AnalysisResult

MANUFACTURER = "covid-cxr reference system (research software)"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "CXR AI COVID-19 report (research, not for diagnosis)"
SC_SERIES_DESCRIPTION = "CXR AI Grad-CAM overlay (research, not for diagnosis)"
# Codes without a standard equivalent: a private coding scheme of this system.
PRIVATE_SCHEME = "99CXRAI"
COVID19 = ("840539006", "SCT", "COVID-19")
DECISION_CONCEPT = ("decision-at-threshold", PRIVATE_SCHEME, "COVID-19 decision at operating threshold")
CHEST_XR = ("36643-5", "LN", "XR Chest 2 Views")  # procedure reported
SC_BANNER_HEIGHT = 84
SC_SIDE = 512


@dataclass
class ResultObjects:
    sr: Dataset
    sc: Dataset

    def datasets(self) -> list[Dataset]:
        return [self.sr, self.sc]


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["cxr-ai-results", *[str(p) for p in parts]])


def result_uids(source: Dataset, result: AnalysisResult) -> dict[str, str]:
    """The deterministic UIDs of the result series and instances of one source image."""
    study, sop = str(source.StudyInstanceUID), str(source.SOPInstanceUID)
    v = f"{result.model_name}/{result.model_version}"
    return {"sr_series": _uid(study, v, "sr-series"), "sc_series": _uid(study, v, "sc-series"),
            "sr": _uid(sop, v, "sr"), "sc": _uid(sop, v, "sc"), "device": _uid("device", v),
            "tracking": _uid(sop, v, "tracking")}


def _instance_number(source: Dataset) -> int:
    try:
        n = int(source.get("InstanceNumber") or 1)
        return n if n > 0 else 1
    except (TypeError, ValueError):
        return 1


# Type 2 attributes of the Patient / General Study modules that highdicom copies from the source:
# present in the results (empty when the source lacks them), so a source that omits one still works.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "AccessionNumber")


def reference_header(source: Dataset) -> Dataset:
    """A copy of the source header (no pixel data) with the copied type 2 attributes present."""
    ref = Dataset()
    for elem in source:
        if elem.tag.group > 0x0002 and elem.keyword != "PixelData" and elem.tag < 0x7FE00010:
            ref.add(elem)
    for keyword in _TYPE2_COPIED:
        if keyword not in ref:
            setattr(ref, keyword, None)
    return ref


def _code(t: tuple[str, str, str]):
    import highdicom as hd

    return hd.sr.CodedConcept(value=t[0], scheme_designator=t[1], meaning=t[2])


def build_sr(source: Dataset, result: AnalysisResult) -> Dataset:
    """The TID 1500 Measurement Report (Comprehensive 3D SR) of one analysed source image."""
    import highdicom as hd

    source = reference_header(source)
    uids = result_uids(source, result)
    approval = result.approval.describe() if result.approval else "approval not recorded"
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids["device"], name=f"{result.model_name} {result.model_version}",
        manufacturer_name=MANUFACTURER, model_name=result.model_name,
        serial_number=f"version {result.model_version}; {approval}")
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device))
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_name, version=str(result.model_version),
        parameters=[approval, f"operating threshold {result.operating_threshold:.4f}"])
    measurements = [
        hd.sr.Measurement(name=codes.DCM.Probability, value=float(round(result.p_covid19, 6)),
                          unit=codes.UCUM.NoUnits),
        hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=float(round(result.operating_threshold, 6)),
                          unit=codes.UCUM.NoUnits),
    ]
    decision = hd.sr.QualitativeEvaluation(name=_code(DECISION_CONCEPT),
                                           value=codes.SCT.Positive if result.positive else codes.SCT.Negative)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids["tracking"], identifier="COVID-19 assessment"),
        finding_type=_code(COVID19), algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=[decision],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
    container = group[0]
    for w in result.warnings:
        container.ContentSequence.append(hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=f"warning {w.get('code', '')}: {w.get('message', '')}"[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    container.ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=DISCLAIMER, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    report = hd.sr.MeasurementReport(observation_context=observation_context, procedure_reported=_code(CHEST_XR),
                                     imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0], series_instance_uid=uids["sr_series"],
        series_number=SR_SERIES_NUMBER, sop_instance_uid=uids["sr"], instance_number=_instance_number(source),
        manufacturer=MANUFACTURER, is_complete=False, is_final=False, is_verified=False,
        series_description=SR_SERIES_DESCRIPTION)
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "covid-cxr reference system local codes"
    scheme.CodingSchemeResponsibleOrganization = "covid-cxr open-source project"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


# ------------------------------------------------------------------ secondary capture
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _resize(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape == shape:
        return arr
    img = Image.fromarray(np.ascontiguousarray(np.nan_to_num(arr)))
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, side: int = SC_SIDE) -> np.ndarray:
    """uint8 (side, side, 3): the radiograph (gray) with the Grad-CAM map blended in (jet-like)."""
    base = np.clip(_resize(np.squeeze(image), (side, side)), 0, 1)
    cam = np.clip(_resize(np.squeeze(heatmap), (side, side)), 0, 1)
    r = np.clip(1.5 - np.abs(4 * cam - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * cam - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * cam - 1), 0, 1)
    alpha = (0.45 * cam)[..., None]
    rgb = (1 - alpha) * base[..., None] + alpha * np.stack([r, g, b], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def banner_lines(result: AnalysisResult) -> list[str]:
    decision = "POSITIVE" if result.positive else "NEGATIVE"
    return [f"P(COVID-19) = {result.p_covid19:.3f}  ->  {decision} at threshold {result.operating_threshold:.3f}",
            f"Model {result.model_name} v{result.model_version}"
            + (f" ({result.approval.describe()})" if result.approval else ""),
            "Grad-CAM overlay: regions that raised P(COVID-19)",
            "RESEARCH SOFTWARE - NOT FOR DIAGNOSTIC USE"]


def annotated_image(result: AnalysisResult, side: int = SC_SIDE) -> np.ndarray:
    """uint8 (banner + side, side, 3): banner text above the overlay (all burned in)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (side, side + SC_BANNER_HEIGHT), (0, 0, 0))
    canvas.paste(Image.fromarray(overlay_rgb(result.image, result.heatmap, side), mode="RGB"), (0, SC_BANNER_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    y = 3
    for i, line in enumerate(banner_lines(result)):
        colour = (255, 80, 80) if i == 3 else (255, 255, 255)
        draw.text((6, y), line[:80], fill=colour, font=font)
        y += 20
    return np.asarray(canvas, dtype=np.uint8)


def build_secondary_capture(source: Dataset, result: AnalysisResult) -> Dataset:
    """RGB secondary capture of the radiograph with the Grad-CAM overlay and burned-in annotation."""
    import highdicom as hd

    source = reference_header(source)
    uids = result_uids(source, result)
    orientation = source.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2 and all(str(v) for v in orientation):
        orientation = (str(orientation[0]), str(orientation[1]))
    else:
        orientation = ("L", "F")  # frontal chest film in the conventional display orientation
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=annotated_image(result), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=uids["sc_series"],
        series_number=SC_SERIES_NUMBER, sop_instance_uid=uids["sc"], instance_number=_instance_number(source),
        manufacturer=MANUFACTURER, patient_orientation=orientation,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)
    sc.BodyPartExamined = "CHEST"  # an unpaired body part: Laterality (type 2C) is absent
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.DerivationDescription = (f"Grad-CAM overlay of {result.model_name} v{result.model_version}; "
                                f"P(COVID-19) {result.p_covid19:.3f}")[:1024]
    sc.ImageComments = DISCLAIMER
    now = datetime.now(timezone.utc)
    sc.ContentDate, sc.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def build_results(source: Dataset, result: AnalysisResult) -> ResultObjects:
    return ResultObjects(sr=build_sr(source, result), sc=build_secondary_capture(source, result))


def encode(ds: Dataset) -> bytes:
    """A result object as a DICOM Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
