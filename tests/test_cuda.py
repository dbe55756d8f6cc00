"""CUDA code paths: the fused layer, mixed precision, channels_last, memory caps, CUDA graphs, fused optimizers.

Skipped where there is no GPU (CI); run on a GPU machine with ``pytest tests/test_cuda.py``.
The same paths' CPU variants are covered in test_layer.py and test_train.py.
"""

import math
import warnings
from contextlib import contextmanager

import pytest
import torch

from attzoom.layer import AttZoom
from attzoom.train import fit, load_checkpoint_model, make_runtime

from test_train import Killed, config, kill_after, small_splits, without_timing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextmanager
def sync_warnings():
    """The messages of every host-device sync inside the block (torch's sync debug mode, warning level)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            syncs: list[str] = []
            yield syncs
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))


@pytest.mark.parametrize("zoom", [1, 2, 3])
def test_fused_equals_literal_on_cuda_in_float64(zoom):
    torch.manual_seed(0)
    fused = AttZoom(8, zoom=zoom, fused=True).double().cuda()
    literal = AttZoom(8, zoom=zoom, fused=False).double().cuda()
    literal.load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    outs, grads = [], []
    for layer in (fused, literal):
        out = layer(x)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
        x.grad = None
    assert (outs[0] - outs[1]).abs().max() < 1e-9
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-9


def test_cuda_defaults_are_bf16_autocast_and_channels_last():
    rt = make_runtime(config(), small_splits())
    assert rt.device.type == "cuda" and rt.channels_last
    assert rt.amp_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def test_fit_on_cuda_trains_and_its_checkpoint_loads_on_cpu(tmp_path):
    result = fit(config(epochs=3, variant="attzoom", lr=3e-3), small_splits(), checkpoint_dir=tmp_path)
    assert result.status == "completed" and all(math.isfinite(m["train_loss"]) for m in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    model, cfg, metrics = load_checkpoint_model(tmp_path / "best.pt", "cpu")
    assert cfg.variant == "attzoom" and metrics["val_top1"] == result.best["val_top1"]
    assert next(model.parameters()).device.type == "cpu"


def test_resume_on_cuda_continues_from_the_checkpoint(tmp_path):
    full = fit(config(epochs=3), small_splits())
    fit(config(epochs=1), small_splits(), checkpoint_dir=tmp_path)
    resumed = fit(config(epochs=3), small_splits(), checkpoint_dir=tmp_path)
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]
    # cuDNN picks kernels per run, so CUDA resumes are close rather than bit-identical.
    for a, b in zip(without_timing(full.history), without_timing(resumed.history)):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.05)


def test_memory_fraction_caps_the_process():
    fit(config(epochs=1, gpu_memory_fraction=0.25), small_splits())
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def test_cuda_graphs_train_like_eager_and_no_graph_is_skipped():
    """compile on CUDA replays the steps as CUDA graphs (mode reduce-overhead): the same metrics as eager
    within tolerance (cuDNN picks kernels per run), validation's last partial batch (520 = 500 + 20)
    included, and inductor skipped no graph (a skip falls back to launching kernels one by one)."""
    from torch._dynamo.utils import counters

    counters.clear()
    cfg, data = dict(epochs=3, variant="attzoom", augment=False, lr=1e-3), small_splits(n_val=520)
    eager = fit(config(**cfg), data)
    graphs = fit(config(compile=True, **cfg), data)
    assert counters["inductor"]["cudagraph_skips"] == 0
    for a, b in zip(eager.history, graphs.history, strict=True):
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=0.05), key
        assert b["val_top1"] == pytest.approx(a["val_top1"], abs=100 * 5 / 520)
        assert 0 <= b["gate_open"] <= 100


def test_cuda_graph_training_resumes_from_its_checkpoint(tmp_path):
    cfg, data = dict(epochs=3, compile=True, augment=True), small_splits()
    straight = fit(config(**cfg), data)
    with pytest.raises(Killed):
        fit(config(**cfg), data, callback=kill_after(1), checkpoint_dir=tmp_path)
    resumed = fit(config(**cfg), data, checkpoint_dir=tmp_path)
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]
    for a, b in zip(without_timing(straight.history), without_timing(resumed.history)):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.05)


def test_eager_cuda_optimizers_are_fused():
    """One kernel for all parameters per step, not several per tensor (a small-image step is launch-bound)."""
    from attzoom.train import make_model, make_optimizer

    cfg = config()
    optimizer = make_optimizer(cfg, make_model(cfg, 4, make_runtime(cfg, small_splits())))
    assert optimizer.defaults["fused"] is True


def test_augmentation_never_waits_for_the_gpu():
    """Random draws and indices go to the GPU without a blocking copy: each one would drain the queue
    and leave the GPU idle while the host launches the next kernels (about 20 per batch)."""
    from attzoom.augment import PaperAugment

    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = PaperAugment(32)(images, torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == images.shape and out.dtype == torch.uint8


@pytest.mark.parametrize("variant", ["baseline", "attzoom"])
def test_a_training_epoch_waits_for_the_gpu_once(variant):
    """Only the epoch's closing loss read syncs: the divergence check every 25 steps reads a flag copied
    one check earlier, the optimizers are fused and the augmentation copies without blocking."""
    from attzoom.augment import PaperAugment
    from attzoom.train import make_model, make_optimizer, make_scheduler, train_one_epoch

    cfg, data = config(batch_size=8, variant=variant), small_splits(n_train=8 * 60)
    rt = make_runtime(cfg, data)
    model = make_model(cfg, data.num_classes, rt)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, 60)
    scaler = torch.amp.GradScaler(enabled=rt.amp_dtype == torch.float16)
    train_set, augment = data.train.to(rt.device), PaperAugment(data.image_size)
    with sync_warnings() as syncs:
        loss, seen = train_one_epoch(model, train_set, cfg, rt, optimizer, scheduler, scaler, augment,
                                     torch.Generator().manual_seed(0))
    assert math.isfinite(loss) and seen == 8 * 60
    assert len(syncs) == 1, syncs


def test_the_epochs_training_state_is_copied_with_one_sync():
    """last.pt's state leaves the GPU in copies that do not wait, then one sync, not one per tensor."""
    from attzoom.train import EarlyStopping, make_model, make_optimizer, make_scheduler, training_state

    cfg, data = config(variant="attzoom"), small_splits()
    rt = make_runtime(cfg, data)
    model = make_model(cfg, data.num_classes, rt)
    optimizer = make_optimizer(cfg, model)
    model(rt.prepare(data.train.images[:4].to(rt.device))).sum().backward()
    optimizer.step()  # Adam's moments exist now
    scheduler, scaler = make_scheduler(cfg, optimizer, 1), torch.amp.GradScaler(enabled=False)
    with sync_warnings() as syncs:
        state = training_state(cfg, data, model, optimizer, scheduler, scaler, torch.Generator(),
                               EarlyStopping(3), [])
    assert len(syncs) <= 1, syncs
    weights = dict(model.state_dict())
    assert all(torch.equal(state["model"][k], weights[k].cpu()) for k in weights)
    assert all(t.device.type == "cpu" for t in state["model"].values())
