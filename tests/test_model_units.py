"""Fast unit checks of the model package: network shapes, transforms, vitals features, metrics edge cases."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def test_fusionnet_modalities_and_shapes():
    import torch

    from models.network import FusionNet, normalise_modalities

    assert normalise_modalities("vitals,image") == ("image", "vitals")
    with pytest.raises(ValueError):
        normalise_modalities("image,ct")
    img, vit = torch.rand(2, 1, 64, 64), torch.randn(2, 16)
    for mods in ("image,vitals", "image", "vitals"):
        net = FusionNet(encoder="small", image_size=64, n_vitals_features=16, modalities=mods).eval()
        assert net(img, vit).shape == (2, 3)
    vit_only = FusionNet(encoder="small", modalities="vitals")
    assert not hasattr(vit_only, "image_encoder")
    with pytest.raises(ValueError):
        FusionNet(encoder="resnet9000")


def test_densenet121_default_encoder():
    from monai.networks.nets import DenseNet121  # noqa: F401

    from models.network import FusionNet

    net = FusionNet(image_size=64)
    assert net.image_encoder.n_features == 1024


def test_vitals_encoder_standardises_on_given_frame_and_flags_missing():
    from models.transforms import N_VITALS_FEATURES, VITAL_FIELDS, VitalsEncoder

    try:
        from models.preprocessing import VITAL_FIELDS as PRE
        assert list(PRE) == VITAL_FIELDS
    except ImportError:
        pass
    df = pd.DataFrame({f: [1.0, 3.0, np.nan] for f in VITAL_FIELDS} | {"sex": ["M", "F", None]})
    enc = VitalsEncoder.fit(df)
    assert enc.mean["spo2_percent"] == pytest.approx(2.0)
    x = enc.encode({"spo2_percent": 3.0, "sex": "female"})
    assert x.shape == (N_VITALS_FEATURES,) == (16,)
    i = VITAL_FIELDS.index("spo2_percent")
    assert x[i] == pytest.approx(1.0)
    assert x[len(VITAL_FIELDS) + i] == 0.0 and x[len(VITAL_FIELDS) + VITAL_FIELDS.index("age_years")] == 1.0
    assert x[2 * len(VITAL_FIELDS) + 1] == 1.0  # F
    assert enc.encode({})[-1] == 1.0  # sex unknown
    back = VitalsEncoder.from_dict(enc.to_dict())
    np.testing.assert_array_equal(back.encode({"age_years": 50}), enc.encode({"age_years": 50}))


def test_eval_path_is_serving_path_and_augmentation_only_in_training(tmp_path):
    from models.transforms import eval_transforms, resize_image, train_transforms

    arr = np.random.default_rng(0).random((1, 256, 256)).astype(np.float16)
    p = tmp_path / "a.npy"
    np.save(p, arr)
    item = {"image": str(p), "vitals": np.zeros(16, np.float32), "label": 0}
    ev1 = np.asarray(eval_transforms(64)(item)["image"])
    ev2 = np.asarray(eval_transforms(64)(item)["image"])
    np.testing.assert_array_equal(ev1, ev2)
    np.testing.assert_array_equal(ev1, resize_image(arr.astype(np.float32), 64))
    assert ev1.shape == (1, 64, 64)
    tf = train_transforms(64)
    tf.set_random_state(seed=1)
    outs = [np.asarray(tf(item)["image"]) for _ in range(4)]
    assert all(o.shape == (1, 64, 64) and o.min() >= 0 and o.max() <= 1 for o in outs)
    assert any(not np.allclose(o, ev1) for o in outs)


def test_threshold_reaches_target_sensitivity():
    from models.evaluate import choose_threshold

    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    sel = choose_threshold(p, y, 0.9)
    assert (p[y] >= sel["threshold"]).mean() >= 0.9
    assert sel["achieved_sensitivity"] >= 0.9
    none = choose_threshold(p, np.zeros(200, bool), 0.9)
    assert none["threshold"] == 0.5 and "no covid19" in none["note"]


def test_temperature_scaling_reduces_ece_of_overconfident_logits():
    from models.evaluate import expected_calibration_error, fit_temperature, softmax

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3))
    logits[np.arange(600), y] += 1.0
    logits *= 5  # over-confident
    t = fit_temperature(logits, y)
    assert t > 2
    assert expected_calibration_error(softmax(logits, t), y) < expected_calibration_error(softmax(logits), y)


def test_evaluation_degenerate_cases_do_not_crash():
    from models.evaluate import evaluate_predictions

    logits = np.random.default_rng(0).normal(size=(6, 3))
    # no covid19 case at all
    ev, _ = evaluate_predictions([1, 2, 2, 1, 2, 2], logits, temperature=1.0, threshold=0.5,
                                 patient_ids=list("aabbcd"), n_bootstrap=50,
                                 meta=pd.DataFrame({"sex": list("MFMFMF"), "age_years": [10, 30, 50, 70, 90, np.nan],
                                                    "view": ["PA"] * 6}))
    cvr = ev["covid19_vs_rest"]
    assert cvr["auroc"]["value"] is None and cvr["sensitivity"]["value"] is None
    # every image is a non-covid19 case, so specificity = share with p_covid19 < threshold; recompute it
    p_covid = np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)
    assert int((p_covid < 0.5).sum()) == 5  # one of the six (row 2, p = 0.545) is a false positive
    assert cvr["specificity"]["value"] == pytest.approx(5 / 6)
    assert cvr["counts"] == {"tp": 0, "fp": 1, "tn": 5, "fn": 0}
    assert cvr["npv"]["value"] == pytest.approx(1.0) and cvr["ppv"]["value"] == pytest.approx(0.0)
    assert any("no covid19" in w for w in ev["warnings"])
    assert ev["per_class_auroc"]["covid19"] is None
    assert ev["subgroups"]["sex"]["M"]["small"] is True
    assert set(ev["subgroups"]["age_band"]) == {"<18", "18-39", "40-59", "60-79", "80+", "unknown"}
    # empty evaluation set
    ev0, _ = evaluate_predictions([], np.zeros((0, 3)), temperature=1.0, threshold=0.5, patient_ids=[])
    assert ev0["n_images"] == 0 and ev0["covid19_vs_rest"]["auroc"]["value"] is None


def test_bootstrap_ci_is_patient_level():
    from models.evaluate import evaluate_predictions

    rng = np.random.default_rng(3)
    n = 120
    y = np.repeat(rng.integers(0, 3, 30), 4)  # 30 patients x 4 images, labels per patient
    logits = np.repeat(rng.normal(size=(30, 3)), 4, axis=0)  # a patient's images look alike
    logits[np.arange(n), y] += 1.5
    ev_pat, _ = evaluate_predictions(y, logits, temperature=1.0, threshold=0.4,
                                     patient_ids=np.repeat(np.arange(30), 4), n_bootstrap=300, seed=0)
    ev_img, _ = evaluate_predictions(y, logits, temperature=1.0, threshold=0.4,
                                     patient_ids=np.arange(n), n_bootstrap=300, seed=0)
    a, b = ev_pat["covid19_vs_rest"]["auroc"], ev_img["covid19_vs_rest"]["auroc"]
    assert a["value"] == pytest.approx(b["value"])
    # clustered images → fewer independent units → a wider interval
    assert (a["ci_high"] - a["ci_low"]) > (b["ci_high"] - b["ci_low"])
    assert ev_pat["n_patients"] == 30 and ev_pat["n_images"] == n


def test_plots_written(tmp_path):
    from models.evaluate import evaluate_predictions, write_plots

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3))
    logits[np.arange(60), y] += 1
    ev, curves = evaluate_predictions(y, logits, temperature=1.3, threshold=0.4, patient_ids=np.arange(60),
                                      n_bootstrap=20)
    paths = write_plots(ev, tmp_path, curves)
    names = [p.name for p in paths]
    # the three summary plots, then P(covid19) reliability overall and per site (issue 13)
    assert {"roc.png", "reliability.png", "confusion.png"} <= set(names)
    assert "reliability_covid19.png" in names and any(n.startswith("reliability_covid19_site-") for n in names)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_pyfunc_image_codec_roundtrip():
    from models.serving import decode_image, encode_image

    for dtype in (np.float16, np.float32):
        a = np.random.default_rng(0).random((1, 8, 8)).astype(dtype)
        b = decode_image(encode_image(a))
        assert b.dtype == dtype and b.shape == (1, 8, 8)
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
def test_gpu_training_step_bf16_channels_last():
    """The GPU path (bf16 autocast, channels_last) computes the same network as fp32 on the CPU, and learns."""
    import copy

    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    from models.network import FusionNet
    from models.train import train_step

    torch.manual_seed(0)
    net_cpu = FusionNet(encoder="densenet121", image_size=224).eval()
    net = copy.deepcopy(net_cpu).cuda().to(memory_format=torch.channels_last).eval()
    img = torch.rand(8, 1, 224, 224)
    vit = torch.randn(8, 16)
    with torch.no_grad():
        ref = net_cpu(img, vit)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            out = net(img.cuda().contiguous(memory_format=torch.channels_last), vit.cuda()).float().cpu()
    rel = (torch.linalg.norm(out - ref) / torch.linalg.norm(ref)).item()
    assert rel < 5e-2, f"bf16 GPU logits differ from fp32 CPU by {rel:.3g} (relative)"

    net.train()
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x = img.cuda().contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1], device="cuda")
    losses = [train_step(net, opt, x, vit.cuda(), y, torch.ones(3, device="cuda"), use_amp=True) for _ in range(15)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall on a fixed batch: {losses[0]:.3f} → {losses[-1]:.3f}"


def test_device_augment_matches_contract():
    import torch

    from models.transforms import device_augment

    x = torch.rand(6, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    y = device_augment(x, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(x, y)
    same = device_augment(x, torch.Generator().manual_seed(0), p_affine=0, p_gamma=0, p_noise=0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)  # identity when nothing is drawn


def test_device_resident_loader_serves_the_cached_split(tmp_path):
    """The GPU path's loader (exercised here on the CPU): every cached item once per epoch, in a seeded
    order, with the DataLoader's batch_size/drop_last semantics and the eval transform's exact pixels."""
    import torch

    from models.train import DeviceResidentLoader, build_loader
    from models.transforms import eval_transforms

    rng = np.random.default_rng(3)
    items = []
    for i in range(11):
        p = tmp_path / f"{i}.npy"
        np.save(p, rng.random((1, 40, 40)).astype(np.float16))
        items.append({"image": str(p), "vitals": np.full(16, i, np.float32), "label": i % 3})
    ds, loader = build_loader(items, eval_transforms(24), batch_size=4, shuffle=True, device="cpu", seed=7,
                              resident=True)
    assert isinstance(loader, DeviceResidentLoader) and len(loader) == 3
    batches = list(loader)
    assert [len(b["label"]) for b in batches] == [4, 4, 3]
    order = torch.cat([b["vitals"][:, 0] for b in batches]).long().tolist()
    assert sorted(order) == list(range(11)) and order != list(range(11))  # a permutation, shuffled
    for b in batches:
        for img, vit, y in zip(b["image"], b["vitals"], b["label"]):
            i = int(vit[0])
            assert int(y) == i % 3
            ref = ds[i]["image"]
            torch.testing.assert_close(img, torch.as_tensor(np.asarray(ref)), rtol=0, atol=0)
    assert img.shape == (1, 24, 24) and img.dtype == torch.float32
    # the epoch's order is a function of the generator's seed (what training reseeds every epoch)
    loader.generator.manual_seed(5)
    first = torch.cat([b["vitals"][:, 0] for b in loader]).tolist()
    loader.generator.manual_seed(5)
    assert torch.cat([b["vitals"][:, 0] for b in loader]).tolist() == first
    _, dropping = build_loader(items, eval_transforms(24), batch_size=4, shuffle=False, device="cpu", seed=0,
                               drop_last=True, resident=True)
    assert len(dropping) == 2 and [len(b["label"]) for b in dropping] == [4, 4]
    assert torch.cat([b["vitals"][:, 0] for b in dropping]).long().tolist() == list(range(8))
