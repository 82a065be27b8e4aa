"""The active-learning loop on real images: rounds of DHO training and selection end to end, the labelled sets it
writes (checked against the trainer's own record and an independent greedy k-center), its log, resumption (after
a kill -9 of the CLI in a round's training, and from a selection cut short), and its settings' checks."""

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from trainer_fixtures import register_tiny_clip, run_settings, tiny_clip_config

from dho_fast.select import STRATEGIES
from dho_fast.select import random as random_picks
from dho_fast.train import checkpoint, cli
from dho_fast.train.active import CLAP_STREAM, initial_set, pool_subsample, read_labelled, round_seed, run_active
from dho_fast.train.active_config import ActiveConfig, load_active_config
from dho_fast.train.build import build_run_student, eval_dataset, load_splits
from dho_fast.train.clap import fit_clap, mean_text_embeddings, write_teacher_logits
from dho_fast.train.config import TrainConfig
from dho_fast.train.splits import k_shot_indices
from dho_fast.train.teacher import ClipTeacher, create_open_clip
from dho_fast.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4  # the trees fixture's digit classes


def active_settings(trees, logits_file, out: Path, **changes) -> dict:
    """Two selection rounds of 4 images from a pool of 120 digits, each round's student trained for 4 steps."""
    train_settings = run_settings(trees, out, teacher="logits", teacher_logits=logits_file)
    for key in ("labelled_fraction", "output_dir"):  # the loop sets these per round
        del train_settings[key]
    settings = dict(
        strategy="pcoreset",
        rounds=2,
        budget=4,
        initial_shots=1,
        pool_size=120,
        output_dir=str(out),
        seed=3,
        progress=False,
        train=train_settings,
    )
    return {**settings, **changes}


def labelled_files(out: Path, rounds: int) -> list[dict]:
    return [read_labelled(out / f"round_{r:02d}") for r in range(rounds + 1)]


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


def blend_probs_of(student, images: torch.Tensor) -> torch.Tensor:
    """METHOD.md's selection vectors, in float64: 0.5 softmax(z_ce) + 0.5 softmax(z_kd)."""
    with torch.no_grad():
        ce, kd = student.logits(images)
    return 0.5 * ce.double().softmax(1) + 0.5 * kd.double().softmax(1)


def brute_force_k_center(pool: torch.Tensor, centres: torch.Tensor, budget: int) -> list[int]:
    """Greedy k-center recomputing every distance each pick: the pool point farthest from its nearest centre."""
    picks = []
    for _ in range(budget):
        nearest = torch.cdist(pool, centres).min(dim=1).values
        nearest[picks] = -1.0
        pick = int(nearest.argmax())  # the first maximum
        picks.append(pick)
        centres = torch.cat([centres, pool[pick : pick + 1]])
    return picks


def student_of_round(config: ActiveConfig, round_index: int):
    state = checkpoint.load(config.round_dir(round_index) / "last.pt")
    train_config = config.round_train_config(round_index)
    student = build_run_student(train_config, state["classnames"], torch.device("cpu"), init_heads=False)
    student.load_state_dict(state["model"])
    return student.eval(), train_config


def images_of(train_config: TrainConfig, student, samples) -> torch.Tensor:
    dataset = eval_dataset(train_config, samples, student)
    return torch.stack([dataset[i]["student"] for i in range(len(dataset))])


def test_initial_set_lists_each_image_once():
    labels = np.array([1, 1, 0, 1, 0, 2])  # 3 shots: class 1 has exactly 3 images, class 0 two, class 2 one
    picks = k_shot_indices(labels, 3, seed=5)
    first_picks = list(dict.fromkeys(picks.tolist()))
    initial = initial_set(labels, 3, seed=5)
    assert initial.dtype == np.int64 and initial.tolist() == first_picks
    assert len(picks) == 9 and initial[:3].tolist() == picks[:3].tolist() and initial[-1] == 5 and len(initial) <= 6
    np.testing.assert_array_equal(initial_set(labels, 1, seed=5), k_shot_indices(labels, 1, seed=5))


@pytest.mark.parametrize("strategy", ["pcoreset", "random"])
def test_two_rounds_end_to_end(trees, logits_file, tmp_path, strategy):
    config = ActiveConfig(**active_settings(trees, logits_file, tmp_path / "run", strategy=strategy))
    records = run_active(config)

    splits = load_splits(config.round_train_config(0))
    labels = splits.train_labels()
    initial = k_shot_indices(labels, 1, config.seed)
    pool = pool_subsample(len(labels), initial, 120, config.seed)
    assert len(pool) == 120 and not set(pool) & set(initial)
    files = labelled_files(tmp_path / "run", 2)
    assert files[0]["labelled"] == initial.tolist() and files[0]["picks"] == []
    assert np.bincount(labels[files[0]["labelled"]]).tolist() == [1] * NUM_CLASSES
    for r, file in enumerate(files):
        labelled = file["labelled"]
        assert file["round"] == r and file["strategy"] == strategy
        assert file["num_labelled"] == len(labelled) == NUM_CLASSES + 4 * r == len(set(labelled))
        state = checkpoint.load(config.round_dir(r) / "last.pt")
        assert state["labelled"].tolist() == sorted(labelled)  # the round's student trained on exactly this set
        assert records[r]["test_acc_blend"] == state["test"]["acc_blend"]
        if r == 0:
            continue
        previous = files[r - 1]["labelled"]
        assert labelled[: len(previous)] == previous and labelled[len(previous) :] == file["picks"]
        assert set(file["picks"]) <= set(pool) and not set(file["picks"]) & set(previous)  # from the pool only

        # The picks, recomputed independently from the previous round's student.
        rest = pool[~np.isin(pool, previous)]
        if strategy == "random":
            generator = torch.Generator().manual_seed(round_seed(config.seed, r - 1))
            want = rest[random_picks(len(rest), 4, generator=generator).numpy()].tolist()
        else:
            student, train_config = student_of_round(config, r - 1)
            pool_probs = blend_probs_of(student, images_of(train_config, student, [splits.train[i] for i in rest]))
            centres = blend_probs_of(student, images_of(train_config, student, [splits.train[i] for i in previous]))
            want = rest[brute_force_k_center(pool_probs, centres, 4)].tolist()
        assert file["picks"] == want

    assert [r["round"] for r in records] == [0, 1, 2]
    assert [r["num_labelled"] for r in records] == [4, 8, 12]
    assert all(r["strategy"] == strategy and 0 <= r["test_acc_kd"] <= 1 for r in records)
    assert records[-1]["select_seconds"] is None and all(r["select_seconds"] > 0 for r in records[:2])
    out = tmp_path / "run"
    assert json.loads((out / "active_log.json").read_text()) == records
    csv_lines = (out / "active_log.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(records[0]) and len(csv_lines) == 4
    assert csv_lines[1].startswith(f"0,4,{strategy},")


def test_resume_skips_finished_rounds_and_recomputes_a_cut_selection(trees, logits_file, tmp_path):
    settings = active_settings(trees, logits_file, tmp_path / "run")
    records = run_active(ActiveConfig(**settings))
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'run'} is not empty: pass resume"):
        run_active(ActiveConfig(**settings))
    # A finished run resumes to the same log without training again.
    mtime = (tmp_path / "run" / "round_02" / "last.pt").stat().st_mtime_ns
    assert run_active(ActiveConfig(**settings, resume=True)) == records
    assert (tmp_path / "run" / "round_02" / "last.pt").stat().st_mtime_ns == mtime

    # What a kill during round 1's selection leaves: round 1 trained, its picks not written, the log at round 0.
    shutil.rmtree(tmp_path / "run" / "round_02")
    (tmp_path / "run" / "active_log.json").write_text(json.dumps(records[:1]))
    resumed = run_active(ActiveConfig(**settings, resume=True))
    assert without_seconds(resumed) == without_seconds(records)
    assert resumed[0] == records[0]  # recorded rounds are kept as they are
    straight = ActiveConfig(**{**settings, "output_dir": str(tmp_path / "straight")})
    run_active(straight)
    assert labelled_files(tmp_path / "run", 2) == labelled_files(tmp_path / "straight", 2)


def test_resume_refuses_changed_settings_and_missing_runs(trees, logits_file, tmp_path):
    settings = active_settings(trees, logits_file, tmp_path / "run", rounds=0)
    with pytest.raises(FileNotFoundError, match="resume is set but .*active_settings.json does not exist"):
        run_active(ActiveConfig(**settings, resume=True))
    run_active(ActiveConfig(**settings))
    changed = {**settings, "budget": 5, "train": {**settings["train"], "lr": 0.5}}
    with pytest.raises(ValueError, match=r"cannot resume: the settings \['budget', 'train.lr'\] differ") as info:
        run_active(ActiveConfig(**changed, resume=True))
    assert "budget: 4 -> 5" in str(info.value) and "train.lr: 0.001 -> 0.5" in str(info.value)
    # Settings that do not change what is computed may change; so may defaults written out.
    same = {**settings, "progress": True, "train": {**settings["train"], "num_workers": 1, "temperature": 2.0}}
    assert len(run_active(ActiveConfig(**same, resume=True))) == 1


def test_labelled_indices_trains_on_exactly_that_set(trees, logits_file, tmp_path):
    path = tmp_path / "labelled.json"
    path.write_text(json.dumps({"labelled": [30, 2, 17, 5]}))
    base = run_settings(trees, tmp_path / "run", teacher="logits", teacher_logits=logits_file)
    base = {**base, "labelled_fraction": None, "labelled_indices": str(path), "max_steps": 2}
    train(TrainConfig(**base))
    assert checkpoint.load(tmp_path / "run" / "last.pt")["labelled"].tolist() == [2, 5, 17, 30]
    path.write_text(json.dumps([2, 5, 17, 31]))
    with pytest.raises(ValueError, match=r"cannot resume: the labelled set \(4 images\) differs"):
        train(TrainConfig(**base, resume=True))


def test_clap_refit_at_the_start_of_every_round(trees, tmp_path):
    """Each round's student learns from CLAP refit on that round's labelled set (not the previous round's): its
    logits file equals an independent refit on the round's labelled.json, and the student's checkpoint records it."""
    name = register_tiny_clip(tmp_path)
    torch.manual_seed(0)
    model, tokenizer, preprocess = create_open_clip(name, None)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)  # one set of random weights for the loop and the check below
    clip = dict(teacher="open_clip", teacher_arch=name, teacher_pretrained=str(weights), teacher_templates="a {}.")
    settings = active_settings(trees, None, tmp_path / "run", rounds=1, teacher_refit="clap")
    settings["train"].update(open_clip_config=tiny_clip_config(tmp_path), teacher_logits=None, **clip)
    config = ActiveConfig(**settings, clap_epochs=2, clap_batch_size=4)
    run_active(config)

    model, tokenizer, preprocess = create_open_clip(name, str(weights))
    splits = load_splits(config.round_train_config(0))
    text_means = mean_text_embeddings(model, tokenizer, splits.classnames, ["a {}."])
    files = []
    for r in range(2):
        labelled = read_labelled(config.round_dir(r))["labelled"]
        samples = [splits.train[i] for i in labelled]
        seed = round_seed(config.seed, r, CLAP_STREAM)
        head = fit_clap(model, preprocess, text_means, samples, epochs=2, batch_size=4, seed=seed)
        want = write_teacher_logits(ClipTeacher(model, head, preprocess), splits.train, tmp_path / f"want{r}.pt")
        path = config.round_dir(r) / "teacher_logits.pt"
        torch.testing.assert_close(torch.load(path, weights_only=True)["logits"], want)
        state = checkpoint.load(config.round_dir(r) / "last.pt")
        assert state["teacher_logits_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert state["config"]["teacher"] == "logits"
        files.append(want)
    assert not torch.equal(files[0], files[1])  # refit on the larger labelled set


ACTIVE_BAD_CONFIGS = [
    ({"strategy": "kmeans"}, ValueError, [f"strategy must be one of {STRATEGIES}", "got 'kmeans'"]),
    ({"rounds": -1}, ValueError, ["rounds must be in [0, inf)", "got -1"]),
    ({"rounds": "3"}, TypeError, ["rounds must be an integer", "got '3' (str)"]),
    ({"budget": 0}, ValueError, ["budget must be in [1, inf)", "got 0"]),
    ({"budget": 2.5}, TypeError, ["budget must be an integer or null", "got 2.5"]),
    ({"pool_size": 0}, ValueError, ["pool_size must be in [1, inf)"]),
    ({"initial_shots": 0}, ValueError, ["initial_shots must be in [1, inf)"]),
    ({"clap_lr": 0}, ValueError, ["clap_lr must be in (0, inf)"]),
    ({"clap_momentum": 1}, ValueError, ["clap_momentum must be in [0, 1)"]),
    ({"seed": True}, TypeError, ["seed must be an integer", "got True (bool)"]),
    ({"resume": "yes"}, TypeError, ["resume must be a boolean", "'yes'"]),
    ({"teacher_refit": "tip"}, ValueError, ["teacher_refit must be one of ('none', 'clap')", "'tip'"]),
    ({"train": [1]}, TypeError, ["train must be a mapping of settings", "got [1] (list)"]),
    ({"rouds": 3}, ValueError, ["unknown config keys ['rouds']"]),
    ({"train": {"lr": "x"}}, TypeError, ["train.lr must be a number", "got 'x'"]),
    ({"train": {"learning_rate": 1}}, ValueError, ["train.unknown config keys ['learning_rate']"]),
    ({"train": {"temperature": 0}}, ValueError, ["train.temperature must be in (0, inf)"]),
    ({"train": {"shots": 2}}, ValueError, ["train settings ['shots'] are set by the active loop"]),
    ({"train": {"output_dir": "x", "resume": True}}, ValueError, ["['output_dir', 'resume'] are set by the active"]),
    ({"teacher_refit": "clap"}, ValueError, ["teacher_refit 'clap'", "train.teacher to 'open_clip'", "'logits'"]),
    ({"train": {"test_weights": "best_val"}}, ValueError, ["train.test_weights must be 'last'", "'best_val'"]),
]


@pytest.mark.parametrize(("changes", "error", "words"), ACTIVE_BAD_CONFIGS, ids=[str(c[0]) for c in ACTIVE_BAD_CONFIGS])
def test_bad_active_config_names_the_setting(tmp_path, changes, error, words):
    train_settings = dict(train_dir="data/train", test_dir="data/test", teacher="logits", teacher_logits="t.pt")
    values = {"train": train_settings, **changes}
    if "train" in changes and isinstance(changes["train"], dict):
        values["train"] = {**train_settings, **changes["train"]}
    path = tmp_path / "active.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(error) as info:
        load_active_config(path)
    assert (error is TypeError) == isinstance(info.value, TypeError)
    for word in words:
        assert word in str(info.value)


def test_run_errors_before_any_training(trees, logits_file, tmp_path):
    with pytest.raises(ValueError, match=r"rounds \* budget \(2 \* 61\) exceeds the pool's 120 images"):
        run_active(ActiveConfig(**active_settings(trees, logits_file, tmp_path / "a", budget=61)))
    with pytest.raises(ValueError, match="pool_size .* exceeds the"):
        run_active(ActiveConfig(**active_settings(trees, logits_file, tmp_path / "b", pool_size=10**6)))
    settings = active_settings(trees, logits_file, tmp_path / "c")
    settings["train"] = {**settings["train"], "test_dir": None}
    with pytest.raises(ValueError, match="reports each round's test accuracy: set train.test_dir"):
        run_active(ActiveConfig(**settings))
    assert not any((tmp_path / d).exists() for d in "abc")  # a run refused at the start writes nothing


def test_cli_errors_exit_2(trees, logits_file, tmp_path, capsys):
    path = tmp_path / "active.yaml"
    path.write_text(yaml.safe_dump(active_settings(trees, logits_file, tmp_path / "run")))
    assert cli.main(["active", "--config", str(path), "--strategy", "kmeans"]) == 2
    assert "dho-fast: error: strategy must be one of" in capsys.readouterr().err
    assert cli.main(["active", "--config", str(path), "--resume"]) == 2
    assert "resume is set but" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("active_*.yaml")))
def test_shipped_active_configs_load(name):
    config = load_active_config(ROOT / "configs" / f"{name}.yaml")
    train_config = config.round_train_config(0)
    assert (config.strategy, config.initial_shots, config.rounds) == ("pcoreset", 1, 15)
    assert (train_config.method, train_config.alpha, train_config.beta) == ("dho", 0.5, 1.0)
    if "imagenet" in name:
        assert (config.pool_size, config.budget, train_config.dataset) == (100_000, 1000, "imagenet")
    else:
        assert (config.pool_size, config.budget, train_config.student) == (None, None, "resnet18")
        recipe = (train_config.dataset, train_config.epoch_length, train_config.epochs)
        assert recipe == ("oxford_pets", "labelled", 200)
        assert (train_config.lr, train_config.labelled_batch_size, train_config.interpolation) == (1e-3, 64, "bilinear")


STEPS, EVERY, KILL_AFTER = 60, 10, 20


def _command(config_path, *flags) -> list[str]:
    return [sys.executable, "-m", "dho_fast.train.cli", "active", "--config", str(config_path), *flags]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic order in every process


def _checkpointed_steps(run_dir: Path) -> list[int]:
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in records if r["kind"] == "checkpoint"]


@pytest.mark.slow  # kill -9 of a real `dho-fast active` subprocess
def test_killed_loop_resumes_with_the_same_picks_and_log(trees, logits_file, tmp_path):
    settings = active_settings(trees, logits_file, tmp_path / "killed")
    settings["train"].update(max_steps=STEPS, checkpoint_every=EVERY, log_every=EVERY)
    config_path = tmp_path / "active.yaml"
    config_path.write_text(yaml.safe_dump(settings))

    process = subprocess.Popen(_command(config_path), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    round_1 = tmp_path / "killed" / "round_01"
    deadline = time.monotonic() + 300
    while max(_checkpointed_steps(round_1), default=0) < KILL_AFTER:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "round 1 wrote no checkpoint in time"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert KILL_AFTER <= checkpoint.load(round_1 / "last.pt")["step"] < STEPS  # killed in round 1's training
    assert len(json.loads((tmp_path / "killed" / "active_log.json").read_text())) == 1

    subprocess.run(_command(config_path, "--resume"), env=_env(), check=True, capture_output=True)
    straight = ["--output-dir", str(tmp_path / "straight")]
    subprocess.run(_command(config_path, *straight), env=_env(), check=True, capture_output=True)
    assert labelled_files(tmp_path / "killed", 2) == labelled_files(tmp_path / "straight", 2)
    logs = [json.loads((tmp_path / d / "active_log.json").read_text()) for d in ("killed", "straight")]
    assert without_seconds(logs[0]) == without_seconds(logs[1]) and len(logs[0]) == 3


@pytest.mark.slow  # the demo's short mode: every strategy, one selection round
def test_active_demo_short_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("run_active", ROOT / "demo" / "run_active.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    flags = ["--source", "digits", "--out", str(tmp_path), "--rounds", "1", "--steps", "5", "--pool-size", "100"]
    flags += ["--threads", str(torch.get_num_threads())]  # leave this process's setting as it is
    outputs = ["--json", str(tmp_path / "results.json"), "--plot", str(tmp_path / "plot.png")]
    summary = demo.main([*flags, "--teacher-epochs", "2", "--seed", "1", "2", *outputs])
    assert json.loads((tmp_path / "results.json").read_text()) == summary
    assert [run["seed"] for run in summary["runs"]] == [1, 2]
    for run in summary["runs"]:
        assert set(run["results"]) == set(STRATEGIES)
        for records in run["results"].values():
            assert [r["num_labelled"] for r in records] == [10, 20]  # 1 shot of 10 digits, then 10 picks
            assert all(0 <= r["test_acc_blend"] <= 1 for r in records)
    for strategy, curve in summary["curves"].items():
        accuracies = [[100 * run["results"][strategy][i]["test_acc_blend"] for run in summary["runs"]] for i in (0, 1)]
        assert curve["labels"] == [10, 20]
        assert curve["mean"] == pytest.approx([np.mean(a) for a in accuracies])
        assert curve["std"] == pytest.approx([np.std(a, ddof=1) for a in accuracies])
    printed = capsys.readouterr().out
    assert "| labels | " + " | ".join(STRATEGIES) + " |" in printed and "\n| 20 | " in printed and " ± " in printed
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "plot.png").is_file() == has_matplotlib
    assert ("matplotlib is not installed" in printed) != has_matplotlib
