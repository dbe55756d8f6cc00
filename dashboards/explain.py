"""``attzoom explain``: where a trained network looks (paper Figs. 2 and 3), from its MLflow run alone.

For N validation images of the run's data set, one PNG grid with a row per image and, per
run, the columns: the input; a Grad-CAM heat map (pytorch-grad-cam) of the predicted class;
for a model with a gated AttZoom layer, the layer's own f(A) upsampled onto the image; and the
attention-guided zoom view (Fig. 3), a separable warp in which rows and columns with more
attention take up more of the picture. Each row is labelled with the image's true class and each
run's prediction; f(A) is drawn on a fixed 0-1 colour scale with its colour bar, so a gate open
everywhere reads as saturated (f = 1), not as a blank panel. Given two runs (e.g. baseline and
attzoom), their columns stand side by side in one grid. The grid is written to ``--out`` and logged to every
run shown under the ``explain/`` artifact path, where ``attzoom report`` finds it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from torch import nn

from tune_jobs.layout import CHECKPOINT, DATASET, ROLE, STUDY, STUDY_ROLE, SWEEP, TRIAL
from tune_jobs.spec import hide_password

from .errors import ReportError
from .figures import png
from .testset import quiet_downloads

PANEL_INCHES = 1.4  # each square panel of the grid
GATE_COLOURS = "viridis"  # f(A) on a fixed 0-1 scale: yellow is a fully open gate
MIN_CAM_SIDE = 4  # Grad-CAM on the deepest stage whose maps are at least this wide (a 1x1 map says nothing)
ARTIFACT_PATH = "explain"

# Candidate Grad-CAM layers per backbone family, deepest first (attzoom.models.BACKBONES names).
_RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1")
TARGET_STAGES: dict[str, tuple[str, ...]] = {
    "resnet50": _RESNET_STAGES, "seresnet50": _RESNET_STAGES, "cbam_resnet50": _RESNET_STAGES,
    "resnext50": _RESNET_STAGES, "resnet18": _RESNET_STAGES, "tiny_resnet": _RESNET_STAGES,
    "densenet121": ("features.denseblock4", "features.denseblock3", "features.denseblock2", "features.denseblock1"),
    "mobilenetv1": ("blocks.4", "blocks.3", "blocks.2", "blocks.1"),
}


@dataclass
class Explanation:
    """Everything one run's columns are drawn from; images are (N, 3, H, W) uint8."""

    run_id: str
    label: str
    images: torch.Tensor
    labels: torch.Tensor  # (N,) true classes
    predicted: torch.Tensor  # (N,) the run's predicted classes
    cams: np.ndarray  # (N, H, W) in [0, 1]
    attention: torch.Tensor | None  # the AttZoom layer's f(A), (N, 1, h, w); None without a gated layer
    zoomed: torch.Tensor | None  # (N, 3, H, W) uint8
    target_layer: str
    names: list[str] | None = None  # each class's name by label (datafiles.class_names); None: numbers alone

    def class_label(self, label: int) -> str:
        return f"{label} {self.names[label]}" if self.names and 0 <= label < len(self.names) else str(label)

    @property
    def columns(self) -> list[str]:
        return ["input", "Grad-CAM"] + (["f(A)", "zoom view"] if self.attention is not None else [])


# --- the pieces -------------------------------------------------------------------------------------

def target_layer(model: nn.Module, backbone: str, image_size: int) -> tuple[str, nn.Module]:
    """The last block of the deepest stage whose output is at least MIN_CAM_SIDE wide for this input size."""
    stages = TARGET_STAGES[backbone]
    sides = {}
    hooks = [model.get_submodule(s).register_forward_hook(
        lambda m, i, out, s=s: sides.__setitem__(s, min(out.shape[-2:]))) for s in stages]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    name = next((s for s in stages if sides[s] >= MIN_CAM_SIDE), stages[-1])
    stage = model.get_submodule(name)
    if isinstance(stage, nn.Sequential) and len(stage) and not _is_inserted(stage):
        return f"{name}[-1]", stage[-1]
    return name, stage


def _is_inserted(stage: nn.Sequential) -> bool:
    """A stage wrapped by build_model with an inserted layer: keep the wrapper, its output is the stage's."""
    from attzoom.layer import AttZoom

    return any(isinstance(m, (AttZoom, nn.Upsample)) for m in stage.children())


def grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module) -> np.ndarray:
    """Grad-CAM of each image's predicted class, (N, H, W) in [0, 1], resized to the input."""
    from pytorch_grad_cam import GradCAM

    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=None)


def attention_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The AttZoom layer's own f(A) for a batch: its input is caught by a hook, then ``attention_map`` on it.

    None when the model has no AttZoom layer or its gate is off (zoom-only: f = 1 says nothing).
    """
    from attzoom.models import find_attzoom

    layer = find_attzoom(model)
    if layer is None or layer.attention is None:
        return None
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(x)
            return layer.attention_map(seen[0]).float()
    finally:
        hook.remove()


def zoom_view(images: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Attention-guided zoom (paper Fig. 3): a separable warp where attention buys picture space.

    f(A), upsampled to the image, is averaged into a row and a column profile; each profile,
    normalised, is a density over the image's height (width). Output pixel u samples the input at
    the inverse of its cumulative sum, so a band holding a fraction p of the attention fills a
    fraction p of the output: high-attention rows and columns expand, the rest shrink. A uniform
    f(A) gives the image back unchanged.
    """
    n, _, h, w = images.shape
    density = F.interpolate(attention.float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    ys = _inverse_cdf(density.mean(dim=2), h)  # (N, H) input row for every output row, in [-1, 1]
    xs = _inverse_cdf(density.mean(dim=1), w)
    grid = torch.stack([xs[:, None, :].expand(n, h, w), ys[:, :, None].expand(n, h, w)], dim=-1)
    warped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return warped.round().clamp(0, 255).to(torch.uint8)


def _inverse_cdf(profile: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size) density -> for each output pixel centre, the input coordinate (grid_sample's [-1, 1])."""
    cdf = torch.cat([profile.new_zeros(len(profile), 1), profile.clamp_min(1e-6).cumsum(1)], dim=1)
    cdf = cdf / cdf[:, -1:]
    edges = torch.linspace(0, 1, size + 1, dtype=profile.dtype)
    centres = (torch.arange(size, dtype=profile.dtype) + 0.5) / size
    out = torch.stack([torch.from_numpy(np.interp(centres.numpy(), c.numpy(), edges.numpy())) for c in cdf])
    return (2 * out - 1).to(profile.dtype)


# --- one run ----------------------------------------------------------------------------------------

def resolve_run(tracking_uri: str, ref: str) -> str:
    """The run id ``ref`` names: a run id, or the Tune trial id a trial run's name shows ("attzoom #3 (7b7d55c1)"),
    which is what a user copies from the MLflow UI's run list or the sweep's progress lines."""
    client = MlflowClient(tracking_uri)
    try:
        return client.get_run(ref).info.run_id
    except Exception:  # noqa: BLE001 - MLflow raises its own exception for an unknown id
        pass
    if not ref.replace("_", "").replace("-", "").isalnum():
        return ref  # not a trial id either: explain() says there is no such run
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(experiments, f"tags.`{TRIAL}` = '{ref}'", max_results=10) if experiments else []
    except Exception as e:  # noqa: BLE001 - MLflow's own errors: the store is there (check_store) but fails
        raise ReportError(f"cannot look up trial id {ref} in {hide_password(tracking_uri)} ({type(e).__name__}); "
                          "pass the run id instead") from None
    if len(found) > 1:
        named = ", ".join(f"{r.info.run_id} ({r.data.tags.get(SWEEP, '?')})" for r in found)
        raise ReportError(f"trial id {ref} names more than one run: {named}; pass the run id of the one to explain")
    return found[0].info.run_id if found else ref


def explain(tracking_uri: str, run_id: str, n_images: int, data_root: str | None = None) -> Explanation:
    """Download the run's best checkpoint, rebuild the model, explain its first N validation images."""
    from attzoom.data import DataError, load
    from attzoom.datafiles import class_names
    from attzoom.train import load_checkpoint_model

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception for an unknown id
        raise ReportError(f"no run {run_id!r} in {hide_password(tracking_uri)}; copy the run id from `attzoom report` "
                          "(best trial per study) or the MLflow UI (or the trial id in a run's name), or pass "
                          "--tracking-uri") from None
    if run.data.tags.get(ROLE) == STUDY_ROLE:
        raise ReportError(study_run_problem(tracking_uri, run))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with quiet_downloads():
                path = client.download_artifacts(run_id, CHECKPOINT, tmp)
        except Exception as e:  # noqa: BLE001 - any store error means: nothing to explain
            raise ReportError(f"run {run_id} has no {CHECKPOINT} artifact ({type(e).__name__}); explain a "
                              "finished trial run") from None
        model, cfg, _ = load_checkpoint_model(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        data = load(cfg.dataset, data_root or cfg.data_root, cfg.val_fraction, download=False)
    except DataError as e:
        raise ReportError(f"{e}; pass --data-root") from None
    images = data.val.images[:n_images]
    mean, std = (torch.tensor(state[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = images.float() / 255
    x = (x - mean) / std
    name, layer = target_layer(model, cfg.backbone, images.shape[-1])
    attention = attention_maps(model, x)
    zoomed = zoom_view(images, attention) if attention is not None else None
    with torch.no_grad():
        predicted = model.eval()(x).argmax(1)
    label = f"{run.data.tags.get('variant', cfg.variant)} ({run_id[:8]})"
    names = class_names(cfg.dataset, Path(data_root or cfg.data_root).expanduser())
    return Explanation(run_id, label, images, data.val.labels[:n_images], predicted, grad_cam(model, x, layer),
                       attention, zoomed, name, names)


def study_run_problem(tracking_uri: str, run) -> str:
    """The line for a study's parent run, which has no model of its own: it names the trial run to explain."""
    from .runs import load_sweep

    name = run.data.tags.get(STUDY, "?")
    study = next((s for s in load_sweep(tracking_uri, run.data.tags.get(SWEEP, "")).studies if s.name == name), None)
    best = study.best if study else None
    hint = f"explain its best trial run, {best.run_id}" if best else "it has no finished trial run yet"
    return f"run {run.info.run_id} is the parent run of study {name}, which holds no model; {hint}"


# --- drawing ----------------------------------------------------------------------------------------

def panels(e: Explanation, i: int) -> list[np.ndarray]:
    """Image i's panels, in ``e.columns`` order: (H, W, 3) uint8 pictures, and f(A) as an (H, W) map in [0, 1]."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = e.images[i].permute(1, 2, 0).numpy()
    h, w = rgb.shape[:2]
    out = [rgb, show_cam_on_image(rgb.astype(np.float32) / 255, e.cams[i], use_rgb=True)]
    if e.attention is not None:
        att = F.interpolate(e.attention[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        out.append(att.clamp(0, 1).numpy())
        out.append(e.zoomed[i].permute(1, 2, 0).numpy())
    return out


def figure(explanations: list[Explanation]) -> Figure:
    """One grid: a row per image labelled with its class and each run's prediction, each run's columns side by
    side under its name, and a colour bar for f(A)."""
    n = min(len(e.images) for e in explanations)
    width = sum(len(e.columns) for e in explanations)
    fig = Figure(figsize=(PANEL_INCHES * width + 1.2, PANEL_INCHES * n + 0.8), layout="constrained")
    axes = fig.subplots(n, width, squeeze=False)
    gate = None
    for i in range(n):
        j = 0
        for e in explanations:
            axes[i, j].set_ylabel(f"true {e.class_label(int(e.labels[i]))}\n"
                                  f"predicted {e.class_label(int(e.predicted[i]))}", fontsize=8)
            for title, panel in zip(e.columns, panels(e, i)):
                ax = axes[i, j]
                if panel.ndim == 2:
                    gate = ax.imshow(panel, cmap=GATE_COLOURS, vmin=0, vmax=1)
                else:
                    ax.imshow(panel)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{e.label}\n{title}" if title == e.columns[0] else f"\n{title}", fontsize=8)
                j += 1
    if gate is not None:
        fig.colorbar(gate, ax=axes.ravel().tolist(), shrink=0.5, label="f(A): 1 = gate fully open")
    return fig


def draw(explanations: list[Explanation]) -> bytes:
    """The grid as PNG bytes."""
    return png(figure(explanations))


def write_explanations(tracking_uri: str, run_ids: list[str], n_images: int = 8, out: str | Path | None = None,
                       data_root: str | None = None, log: bool = True) -> Path:
    """Explain one run (or two side by side), write the PNG grid and log it to each run under ``explain/``."""
    check_one_data_set(tracking_uri, run_ids)
    explanations = [explain(tracking_uri, r, n_images, data_root) for r in run_ids]
    folder = Path(out) if out else Path("reports") / "explain" / run_ids[0]
    folder.mkdir(parents=True, exist_ok=True)
    name = "explain-" + "-vs-".join(r[:8] for r in run_ids) + ".png"
    path = folder / name
    path.write_bytes(draw(explanations))
    if log:
        client = MlflowClient(tracking_uri)
        for run_id in run_ids:
            client.log_artifact(run_id, str(path), ARTIFACT_PATH)
    return path


def check_one_data_set(tracking_uri: str, run_ids: list[str]) -> None:
    """Two runs side by side explain the same images only when they trained on one data set: else the grid set
    different images row by row as if they were a comparison. Unknown runs are left to explain() to name."""
    client = MlflowClient(tracking_uri)
    try:
        datasets = [client.get_run(r).data.tags.get(DATASET) for r in run_ids]
    except Exception:  # noqa: BLE001 - MLflow raises its own exception for an unknown id
        return
    if len(set(datasets)) > 1 and None not in datasets:
        sides = " and ".join(f"{r} on {d}" for r, d in zip(run_ids, datasets))
        raise ReportError(f"{sides}: runs side by side must have trained on one data set (the grid shows the same "
                          "images for both); explain each alone")


def logged_pngs(tracking_uri: str, run_id: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of the PNGs a run holds under ``explain/`` (for the report); none is fine."""
    client = MlflowClient(tracking_uri)
    try:
        files = [f.path for f in client.list_artifacts(run_id, ARTIFACT_PATH) if f.path.endswith(".png")]
    except Exception:  # noqa: BLE001 - a store without the folder: nothing to show
        return []
    found = []
    with tempfile.TemporaryDirectory() as tmp, quiet_downloads():
        for f in files:
            found.append((Path(f).name, Path(client.download_artifacts(run_id, f, tmp)).read_bytes()))
    return found
