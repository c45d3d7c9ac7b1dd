"""Training on real Ray Train: one run on S3 that loses a worker and is resumed, the recipe's parts in
process, and validation against segment -> eval."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import s3fs
import torch

from batchseg.analysis.evaluate import evaluate_output
from batchseg.segment.driver import run_segment
from batchseg.segment.job import SegmentConfig
from batchseg.train.config import TrainConfig
from batchseg.train.synth import write_dataset
from batchseg.train.trainer import run_training
from tests.processes import ray_worker_pids, wait_for
from tests.s3server import SECRET, S3Server


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return write_dataset(str(tmp_path_factory.mktemp("shapes")), 24, seed=1, size=96)


def short_run(shapes: Any, output: pathlib.Path, **changes: Any) -> TrainConfig:
    options: dict[str, Any] = {
        "workers": 2,
        "iterations": 4,
        "checkpoint_every": 2,
        "batch_size": 2,
    } | changes
    return TrainConfig(images=shapes.images, annotations=shapes.annotations, output=str(output), **options)


# One training run stands for every Ray Train behaviour (a TorchTrainer start costs ~25 s here): two DDP
# workers, each option of the recipe that must reach them, checkpoints on S3, a worker killed after the first
# checkpoint (Ray Train restores both from it), then the same command with more iterations (a resume).
RECIPE: dict[str, Any] = {
    "betas": (0.9, 0.99),
    "rois_per_image": 8,  # (the model's: 64) bf16 is emulated on CPUs without it, ~10x slower than fp32,
    "precision": "bf16",  # and its steps cost by the proposal: ~1.7 s an image at 8 here, ~4 s at 16
    "warmup_iterations": 2,
    "min_sizes": (80, 96),  # the last is what evaluation, then segment, resize to
    "max_size": 128,
}
# A start costs more than a step: the kill lands after the first checkpoint (step 2, registered at the Ray
# Train controller's next poll, every 0.2 s in tests: conftest.py) with 6 steps and 3 checkpoints to go.
ITERATIONS, EVERY = 8, 2
RUN = "out/runs/killed"  # bucket/prefix of the run folder


@dataclass(frozen=True)
class FirstRun:
    """What the killed and restored run returned and left on S3 (read before the rerun replaces it)."""

    config: TrainConfig
    metrics: dict[str, Any]
    checkpoints: list[str]  # the run folder's checkpoint_* folders
    first_checkpoint: dict[str, Any]  # the metrics of the first checkpoint registered (before the kill)
    registered: list[int]  # the steps of the checkpoints in Ray Train's snapshot at the end
    last_checkpoint: dict[str, Any]  # the newest checkpoint's model.pt
    model: dict[str, Any]  # <run>/model.pt
    metrics_file: dict[str, Any]  # <run>/metrics.json


def bucket_fs(s3: S3Server) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True, **s3.options())


def registered_checkpoints(fs: s3fs.S3FileSystem) -> list[dict[str, Any]]:
    """The metrics reported with each checkpoint that Ray Train has registered (its snapshot), oldest first."""
    try:
        snapshot = json.loads(fs.cat_file(f"{RUN}/checkpoint_manager_snapshot.json"))
        return [r["metrics"] for r in snapshot["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def checkpoints(fs: s3fs.S3FileSystem) -> list[str]:
    """The run's checkpoint folders (``checkpoint_manager_snapshot.json`` beside them is a file)."""
    listing = fs.ls(RUN, detail=True, refresh=True)
    return sorted(
        e["name"]
        for e in listing
        if e["type"] == "directory" and e["name"].split("/")[-1].startswith("checkpoint_")
    )


def load(fs: s3fs.S3FileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return torch.load(f, weights_only=True)


@pytest.fixture(scope="module")
def first_run(ray_address: str, s3: S3Server) -> FirstRun:
    data = write_dataset("s3://data/train-killed", 16, seed=1, size=96, storage_options=s3.options())
    config = TrainConfig(
        images=data.images,
        annotations=data.annotations,
        output=f"s3://{RUN}",
        workers=2,
        iterations=ITERATIONS,
        checkpoint_every=EVERY,
        batch_size=1,  # an image a step: emulated bf16's cost (above)
        max_failures=1,
        storage_options=s3.options(),
        **RECIPE,
    )
    fs = bucket_fs(s3)
    result: dict[str, Any] = {}

    def train() -> None:
        try:
            result.update(run_training(config))
        except Exception as e:  # raised below, in the test
            result["error"] = e

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        wait_for(
            lambda: registered_checkpoints(fs) and ray_worker_pids("RayTrainWorker"),
            180,
            "a checkpoint that Ray Train has registered",
        )
        before_kill = registered_checkpoints(fs)
        os.kill(ray_worker_pids("RayTrainWorker")[0], signal.SIGKILL)
    finally:
        trainer.join(timeout=400)
    assert not trainer.is_alive(), "training did not end in 400 s"
    if "error" in result:
        raise result["error"]
    found = checkpoints(fs)
    return FirstRun(
        config=config,
        metrics=result,
        checkpoints=found,
        first_checkpoint=before_kill[0],
        registered=[m["step"] for m in registered_checkpoints(fs)],
        last_checkpoint=load(fs, f"{found[-1]}/model.pt"),
        model=load(fs, f"{RUN}/model.pt"),
        metrics_file=json.loads(fs.cat_file(f"{RUN}/metrics.json")),
    )


@pytest.fixture(scope="module")
def rerun(first_run: FirstRun) -> dict[str, Any]:
    """The same command with more iterations: it resumes from the first run's last checkpoint."""
    return run_training(replace(first_run.config, iterations=ITERATIONS + 2))


@pytest.mark.slow
def test_a_killed_worker_is_restarted_from_the_last_checkpoint(first_run: FirstRun) -> None:
    assert (first_run.first_checkpoint["step"], first_run.first_checkpoint["resumed_from"]) == (EVERY, 0)
    assert first_run.metrics["step"] == ITERATIONS
    assert first_run.metrics["resumed_from"] >= EVERY, "training restarted from a checkpoint, not from zero"


@pytest.mark.slow
def test_two_workers_write_checkpoints_to_s3_and_register_them(first_run: FirstRun) -> None:
    assert first_run.registered == [ITERATIONS - EVERY, ITERATIONS]  # one every EVERY steps, 2 newest kept
    # a worker killed while reporting may leave a folder that Ray Train never registered: batchseg names its
    # checkpoint folders by step and removes those at the end, so the folders are the registered ones
    assert [int(name.rsplit("-", 1)[1]) for name in first_run.checkpoints] == first_run.registered
    assert first_run.metrics_file["step"] == ITERATIONS
    assert first_run.metrics_file["model"] == f"s3://{RUN}/model.pt"


@pytest.mark.slow
def test_the_options_reach_the_workers_and_the_schedule_survives_the_restart(first_run: FirstRun) -> None:
    last = first_run.last_checkpoint
    assert last["step"] == ITERATIONS
    assert last["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)  # the options reached the workers
    # a restored worker goes on with the schedule where it stopped, not from the restore's step 0
    assert last["scheduler"]["last_epoch"] == ITERATIONS
    assert {k: last["config"][k] for k in RECIPE} == RECIPE
    assert last["config"]["workers"] == 2


@pytest.mark.slow
def test_model_pt_is_the_deployable_part_of_the_last_checkpoint(first_run: FirstRun) -> None:
    final = first_run.model
    assert (final["step"], final["model_name"]) == (ITERATIONS, "maskrcnn_small")
    assert final["categories"] == ["__background__", "circle", "square", "triangle"]
    assert "optimizer" not in final and final["config"]["workers"] == 2
    assert (final["min_size"], final["max_size"]) == (96, 128)  # segment resizes as it was trained
    assert torch.equal(
        final["model"]["backbone.body.conv1.weight"],
        first_run.last_checkpoint["model"]["backbone.body.conv1.weight"],
    )


@pytest.mark.slow
def test_a_rerun_with_more_iterations_resumes_from_the_checkpoint_on_s3(
    s3: S3Server, first_run: FirstRun, rerun: dict[str, Any]
) -> None:
    assert (rerun["step"], rerun["resumed_from"]) == (ITERATIONS + 2, ITERATIONS)
    fs = bucket_fs(s3)
    assert load(fs, f"{RUN}/model.pt")["step"] == ITERATIONS + 2
    assert json.loads(fs.cat_file(f"{RUN}/metrics.json"))["step"] == ITERATIONS + 2


@pytest.mark.slow
def test_training_never_writes_the_secret_key(
    s3: S3Server, first_run: FirstRun, rerun: dict[str, Any]
) -> None:
    """Its storage options hold SECRET (``s3.options()``): not in the run folder, nor in Ray's logs."""
    import ray

    fs = bucket_fs(s3)
    written = fs.find(RUN)
    assert any(p.endswith("/model.pt") for p in written)
    for path in written:
        assert SECRET.encode() not in fs.cat_file(path), path
    # this session's own logs: other Ray sessions on the machine may have started later
    logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path())
    assert logs.is_dir()
    for log in logs.rglob("*"):
        if log.is_file():
            assert SECRET.encode() not in log.read_bytes(), log


def test_the_small_model_overfits_three_images_in_a_few_steps(
    tmp_path: pathlib.Path, one_thread: None
) -> None:
    """The recipe learns (plain PyTorch, no Ray): 30 steps on 3 images bring the loss down to a fifth and
    the model then finds those images' shapes. ``bench/train.py`` trains the whole recipe (240 steps) and
    segments a held-out set (BENCHMARKS.md, "Learning the shapes in 240 steps")."""
    from batchseg.inference.models import resolve_weights
    from batchseg.train.data import CocoInstances, collate
    from batchseg.train.engine import evaluate_model as validate
    from batchseg.train.engine import make_optimizer, make_scheduler, train_one_epoch
    from batchseg.train.trainer import train_model

    torch.manual_seed(0)
    data_set = write_dataset(str(tmp_path / "three"), 3, seed=1, size=80)
    data = CocoInstances(data_set.images, data_set.annotations)
    config = short_run(
        data_set, tmp_path / "run", iterations=30, rois_per_image=32, min_sizes=(80,), max_size=160
    )
    model = train_model(resolve_weights("none", "maskrcnn_small"), data.categories, config)
    optimizer = make_optimizer(model, "adamw", 3e-3, 1e-4, (0.9, 0.99))
    losses: list[float] = []
    batch = collate([data[i] for i in range(3)])
    step = train_one_epoch(
        model,
        optimizer,
        make_scheduler(optimizer, 30, 5, "cosine"),
        [batch] * 30,
        torch.device("cpu"),
        step=0,
        max_steps=30,
        grad_clip=config.grad_clip,
        on_step=lambda step, metrics: losses.append(metrics["loss"]),
    )
    assert step == 30
    first, last = np.mean(losses[:2]), np.mean(losses[-5:])
    assert last < first / 5, losses  # about 5.8 -> 0.6 on this machine
    found = validate(model, data)
    assert found["segm"]["AP50"] >= 0.6 and found["bbox"]["AP50"] >= 0.6, found  # 0.92 and 0.75 here


def test_fine_tuning_a_91_class_checkpoint_replaces_the_heads(
    shapes: Any, tmp_path: pathlib.Path, one_thread: None
) -> None:
    """The path of --weights DEFAULT (COCO's 91 classes -> the data set's 4), with a checkpoint made here:
    the model that each training worker builds (``train_model``) and one step of it, without Ray (the
    Ray run above records the resize and trains the workers' model)."""
    from torchvision.models import get_model
    from torchvision.ops.misc import FrozenBatchNorm2d

    from batchseg.inference.models import resolve_weights
    from batchseg.train.data import CocoInstances, collate
    from batchseg.train.engine import make_optimizer, make_scheduler, train_one_epoch
    from batchseg.train.trainer import train_model

    pretrained = tmp_path / "coco-like.pth"
    torch.save(
        get_model("maskrcnn_resnet50_fpn", weights=None, weights_backbone=None, num_classes=91).state_dict(),
        pretrained,
    )
    config = short_run(
        shapes,
        tmp_path / "run",
        model="maskrcnn_resnet50_fpn",
        weights=str(pretrained),
        workers=1,
        iterations=1,
        batch_size=1,
        min_sizes=(96,),
        max_size=128,
    )
    data = CocoInstances(shapes.images, shapes.annotations)
    model = train_model(resolve_weights(config.weights, config.model), data.categories, config)
    state = model.state_dict()
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    assert state["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 4
    old = torch.load(pretrained, weights_only=True)
    key = "backbone.body.layer1.0.conv1.weight"
    assert torch.equal(state[key], old[key])  # the trunk came from the checkpoint
    assert (model.transform.min_size, model.transform.max_size) == ((96,), 128)
    optimizer = make_optimizer(model, "adamw", config.learning_rate, config.weight_decay)
    losses: list[float] = []
    step = train_one_epoch(
        model,
        optimizer,
        make_scheduler(optimizer, 1, 0, "cosine"),
        [collate([data[0]])],
        torch.device("cpu"),
        step=0,
        max_steps=1,
        on_step=lambda step, metrics: losses.append(metrics["loss"]),
    )
    assert step == 1 and np.isfinite(losses).all()
    # torchvision's fine-tuning: conv1 and layer1 frozen, BatchNorm frozen everywhere, the rest trained
    trunk: Any = model.backbone.body
    after = model.state_dict()
    frozen = [f"backbone.body.{n}" for n, p in trunk.named_parameters() if not p.requires_grad]
    frozen += [
        f"backbone.body.{name}.{value}"
        for name, module in trunk.named_modules()
        if isinstance(module, FrozenBatchNorm2d)
        for value in ("weight", "bias", "running_mean", "running_var")
    ]
    assert len(frozen) == 11 + 53 * 4
    assert all(torch.equal(after[k], old[k]) for k in frozen)
    key = "backbone.body.layer2.0.conv1.weight"
    assert not torch.equal(after[key], old[key])


def rois_sampled(model: torch.nn.Module, images: Any, targets: Any) -> dict[str, list[int]]:
    """The proposals per image that one training step of ``model`` pools for its box and mask heads
    (``box_roi_pool``, ``mask_roi_pool``: each takes features, boxes per image, image sizes)."""
    sampled: dict[str, list[int]] = {}
    heads: Any = model.roi_heads
    for name in ("box_roi_pool", "mask_roi_pool"):
        getattr(heads, name).register_forward_hook(
            lambda module, inputs, output, name=name: sampled.update({name: [len(b) for b in inputs[1]]})
        )
    losses = model(images, targets)
    assert all(torch.isfinite(loss) for loss in losses.values())
    return sampled


def test_rois_per_image_is_how_many_proposals_of_an_image_the_heads_learn_from(
    shapes: Any, tmp_path: pathlib.Path
) -> None:
    from batchseg.inference.models import resolve_weights
    from batchseg.train.data import CocoInstances, collate
    from batchseg.train.trainer import train_model

    data = CocoInstances(shapes.images, shapes.annotations)
    images, targets = collate([data[0], data[1]])
    weights = resolve_weights("none", "maskrcnn_small")
    for rois, expected in ((None, 64), (8, 8)):  # None: the model's own
        model = train_model(
            weights, data.categories, short_run(shapes, tmp_path, rois_per_image=rois)
        ).train()
        sampled = rois_sampled(model, images, targets)
        assert sampled["box_roi_pool"] == [expected, expected]  # random weights: proposals to spare
        assert all(1 <= n <= expected // 4 for n in sampled["mask_roi_pool"])  # the positives


def test_bf16_on_a_cpu_runs_the_forward_pass_in_bfloat16_and_keeps_fp32_weights_and_boxes(
    shapes: Any, tmp_path: pathlib.Path, one_thread: None
) -> None:
    from batchseg.inference.models import resolve_weights
    from batchseg.inference.precision import autocast_dtype
    from batchseg.train.data import CocoInstances, collate
    from batchseg.train.engine import make_optimizer, make_scheduler, train_one_epoch
    from batchseg.train.trainer import train_model

    cpu = torch.device("cpu")
    assert [autocast_dtype(p, cpu) for p in ("bf16", "auto", "fp32")] == [torch.bfloat16, None, None]
    data = CocoInstances(shapes.images, shapes.annotations)
    # few proposals and small images: emulated bf16 (RECIPE above) makes each of them costly
    config = short_run(shapes, tmp_path, precision="bf16", rois_per_image=8, min_sizes=(64,), max_size=96)
    model = train_model(resolve_weights("none", "maskrcnn_small"), data.categories, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dtypes: list[torch.dtype] = []
    model.backbone.register_forward_hook(lambda module, inputs, output: dtypes.append(output["0"].dtype))
    # the proposals, then the boxes the box head regresses from them (their targets, their loss): float32
    model.rpn.register_forward_hook(lambda module, inputs, output: dtypes.append(output[0][0].dtype))
    model.roi_heads.box_predictor.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output[1].dtype)
    )
    optimizer = make_optimizer(model, "adamw", 1e-3, 1e-4)
    losses: list[float] = []
    step = train_one_epoch(
        model,
        optimizer,
        make_scheduler(optimizer, 1, 0, "cosine"),
        [collate([data[0], data[1]])],
        cpu,
        step=0,
        max_steps=1,
        amp_dtype=autocast_dtype("bf16", cpu),
        on_step=lambda step, metrics: losses.append(metrics["loss"]),
    )
    assert step == 1 and np.isfinite(losses).all()
    assert dtypes == [torch.bfloat16, torch.float32, torch.float32]
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype for k, v in before.items())  # the weights stay fp32
    assert not torch.equal(after["backbone.body.conv1.weight"], before["backbone.body.conv1.weight"])


def test_validation_ap_equals_segment_then_eval_with_empty_and_unreadable_images(
    ray_address: str, tmp_path: pathlib.Path
) -> None:
    """Validation predicts on every image of the ground truth (empty ones too: their false positives count)
    and keys each prediction by the image it came from, even when an image before it cannot be read."""
    from batchseg.demo import SHAPES_MODEL
    from batchseg.inference.models import build_model, load_state_dict, resolve_weights
    from batchseg.train.synth import draw_shapes, jpeg_bytes

    data = write_dataset(str(tmp_path / "val"), 10, seed=7)
    coco = json.loads(pathlib.Path(data.annotations).read_text())
    images = pathlib.Path(data.images)
    (images / "img-000002.jpg").write_bytes(b"\xff\xd8 not really a JPEG")  # unreadable, has annotations
    rng = np.random.default_rng(11)
    for image_id in (101, 102):  # shapes on them, but no annotations: every detection is a false positive
        pixels = draw_shapes(rng).pixels
        (images / f"empty-{image_id}.jpg").write_bytes(jpeg_bytes(pixels))
        height, width = pixels.shape[:2]
        coco["images"].insert(
            1, {"id": image_id, "file_name": f"empty-{image_id}.jpg", "width": width, "height": height}
        )
    pathlib.Path(data.annotations).write_text(json.dumps(coco))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "uri,image_id\n" + "".join(f"{images / i['file_name']},{i['id']}\n" for i in coco["images"])
    )

    from batchseg.train.data import CocoInstances
    from batchseg.train.engine import evaluate_model

    info = resolve_weights(str(SHAPES_MODEL))
    # the model's own score threshold (0.05); the resize it was validated at in training, as segment uses it
    model = build_model(info, load_state_dict(info), min_size=info.min_size, max_size=info.max_size)
    validation = evaluate_model(model, CocoInstances(data.images, data.annotations))

    output = str(tmp_path / "segmented")
    run_segment(
        SegmentConfig(manifest=str(manifest), output=output, weights=str(SHAPES_MODEL), score_threshold=0.05)
    )
    segmented = evaluate_output(output, data.annotations)
    assert segmented["images"] == {
        "evaluated": 12,
        "matched": 11,
        "unmatched_rows": 0,
        "error_rows": 1,
        "duplicate_rows": 0,
    }
    for kind in ("bbox", "segm"):
        assert validation[kind] == pytest.approx(segmented[kind], abs=1e-9), kind


@pytest.mark.slow
def test_sigterm_stops_training_in_one_line_and_leaves_no_unregistered_checkpoint(
    shapes: Any, tmp_path: pathlib.Path
) -> None:
    """Kubernetes stops a training pod with SIGTERM: one line, exit 143, no Ray stack dump; the registered
    checkpoints stay for the rerun, and the folders Ray Train never registered are removed (a worker may be
    writing one when the signal comes; ``checkpoint-000000999`` stands for one, always there)."""
    import subprocess
    import sys

    from batchseg.train.trainer import checkpoint_name

    run = tmp_path / "run"
    # The command starts a Ray of its own (`local`: not one a multi-node test started), as a pod's does: a run stopped on the session's Ray would leave
    # its request for a worker's CPU with Ray Train's autoscaling coordinator for 180 s, and the next elastic
    # run there (test_train_elastic.py) would start with one worker.
    batchseg = str(pathlib.Path(sys.executable).parent / "batchseg")
    args = [batchseg, "train", "--images", shapes.images, "--annotations", shapes.annotations, "--output",
            str(run), "--workers", "1", "--iterations", "200", "--checkpoint-every", "1", "--batch-size", "1",
            "--address", "local"]  # fmt: skip
    snapshot = run / "checkpoint_manager_snapshot.json"
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:
        trainer = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: snapshot.exists(), 100, "a checkpoint that Ray Train has registered")
            (run / checkpoint_name(999)).mkdir()
        finally:
            trainer.send_signal(signal.SIGTERM)
            code = trainer.wait(timeout=60)
    lines = stderr.read_text().splitlines()
    said = "batchseg: stopped by SIGTERM; checkpoints are kept, and rerunning the same command resumes from"
    assert lines[-1] == f"{said} the last", lines
    assert code == 143, lines
    assert not [line for line in lines if "received at" in line], lines  # Ray's C++ stack dump
    snapshot_names = json.loads(snapshot.read_text())["checkpoint_results"]
    registered = {r["checkpoint_dir_name"] for r in snapshot_names}
    folders = {p.name for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint")}
    assert registered and folders == registered
