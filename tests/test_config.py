"""raycap.config: YAML sections into the library's dataclasses, flag precedence, errors, redaction,
and the jobs' exit codes and messages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from pydantic import BaseModel
from ray.exceptions import RayTaskError

from raycap.config import ConfigError, JobParser, from_dict, load_yaml, print_config, run_job
from raycap.demo import DemoConfig
from raycap.features import ExtractConfig
from raycap.models.decoders import DecoderConfig
from raycap.models.encoder import EncoderConfig
from raycap.recipe import TrainConfig
from raycap.train import TrainJobConfig

ROOT = Path(__file__).resolve().parents[1]
COCO_YAML = ROOT / "configs" / "coco.yaml"
JOB_TIMEOUT_S = 180  # a job's imports alone take ~15 s on a loaded 2-core machine


def _job(name: str) -> ModuleType:
    """A jobs/<name>.py script as a module (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"raycap_job_{name}", ROOT / "jobs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def extract_job() -> ModuleType:
    return _job("extract_features")


@pytest.fixture(scope="module")
def train_job() -> ModuleType:
    return _job("train")


@pytest.fixture(scope="module")
def evaluate_job() -> ModuleType:
    return _job("evaluate")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- from_dict and load_yaml --------------------------------------------------------------------


def test_from_dict_builds_nested_dataclasses_and_keeps_defaults() -> None:
    cfg = from_dict(ExtractConfig, {"out": "o", "coco_root": "c", "encoder": {"arch": "resnet50"}, "splits": ["val"]})
    assert cfg.encoder == EncoderConfig(arch="resnet50")
    assert cfg.splits == ("val",)
    assert cfg.batch_size == ExtractConfig(out="o", coco_root="c").batch_size


def test_unknown_key_names_the_section_the_known_keys_and_a_close_match() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(TrainJobConfig, {"features": "f", "train": {"lr_decy": 0.5}}, "train")
    message = str(info.value)
    assert message.startswith("unknown key 'lr_decy' in section train.train")
    assert "did you mean 'lr_decay'?" in message
    assert "known: epochs, captions_per_step, lr," in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": {"epochs": "many"}}, "train.train.epochs: expected an integer, got 'many'"),
        ({"train": {"epochs": True}}, "train.train.epochs: expected an integer, got True"),
        ({"use_gpu": "yes"}, "train.use_gpu: expected bool, got 'yes'"),
        ({"decoder": "attention"}, "train.decoder: expected a mapping of DecoderConfig fields"),
    ],
)
def test_wrong_types_name_the_key(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        from_dict(TrainJobConfig, {"features": "f", **data}, "train")


def test_exponent_floats_without_a_dot_load_as_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "train:\n  lr: 4e-4\n  grad_clip: 5\n")
    section = load_yaml(path, "train")
    assert section["lr"] == "4e-4"  # what YAML 1.1 makes of it
    cfg = from_dict(TrainConfig, section)
    assert cfg.lr == 4e-4 and isinstance(cfg.grad_clip, float)


def test_dataclass_validation_and_missing_keys_name_the_section() -> None:
    with pytest.raises(ConfigError, match="section extract: give exactly one input"):
        from_dict(ExtractConfig, {"out": "o", "coco_root": "c", "images": "i"}, "extract")
    with pytest.raises(ConfigError, match="missing key 'out' in section extract"):
        from_dict(ExtractConfig, {"coco_root": "c"}, "extract")


def test_load_yaml_errors_say_what_is_wrong(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "extract: {out: o}\ntrain:\n")
    assert load_yaml(path, "train") == {}
    with pytest.raises(ConfigError, match="has no section 'bulk'; its sections: extract, train"):
        load_yaml(path, "bulk")
    with pytest.raises(FileNotFoundError, match="config file .*missing.yaml not found"):
        load_yaml(tmp_path / "missing.yaml", "train")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_yaml(_write(tmp_path / "list.yaml", "train: [1, 2]\n"), "train")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml(_write(tmp_path / "bad.yaml", "train: {lr: [\n"), "train")


@pytest.mark.integration
def test_a_config_file_can_live_in_a_bucket(s3_server, train_job: ModuleType) -> None:
    bucket = s3_server.make_bucket()
    body = b"train:\n  features: s3://data/features\n  train: {epochs: 3}\n"
    s3_server.client().put_object(Bucket=bucket, Key="configs/coco.yaml", Body=body)
    configs = train_job.job_configs(train_job.parse_args(["--config", f"s3://{bucket}/configs/coco.yaml"]))
    assert [(c.features, c.train.epochs) for c in configs] == [("s3://data/features", 3)] * 2
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/configs/missing.yaml does not exist"):
        load_yaml(f"s3://{bucket}/configs/missing.yaml", "train")


# --- precedence: reference defaults < YAML < flags ----------------------------------------------


def test_jobs_without_a_file_keep_the_reference_defaults(
    extract_job: ModuleType, train_job: ModuleType, evaluate_job: ModuleType
) -> None:
    assert extract_job.parse_args(["--coco-root", "c", "--out", "o"]) == ExtractConfig(out="o", coco_root="c")
    configs = train_job.job_configs(train_job.parse_args(["--features", "f"]))
    assert configs == [TrainJobConfig("f", DecoderConfig(kind)) for kind in ("attention", "gru")]
    evaluate = evaluate_job.parse_args(["--checkpoint", "ck", "--features", "f"])
    assert (evaluate.beam_size, evaluate.max_decode_len) == (TrainConfig().beam_size, TrainConfig().max_decode_len)
    assert _job("demo").parse_args([]) == DemoConfig()


def test_flags_override_yaml_which_overrides_defaults(tmp_path: Path, train_job: ModuleType) -> None:
    path = _write(
        tmp_path / "c.yaml",
        "train:\n"
        "  features: from-yaml\n"  # satisfies the required --features
        "  decoder: {kind: gru, dropout: 0.3}\n"
        "  train: {lr: 2.0e-4, epochs: 7, eval_batch_size: 16}\n"  # eval_batch_size has no flag
        "  num_workers: 3\n",
    )
    (cfg,) = train_job.job_configs(train_job.parse_args(["--config", str(path), "--lr", "1e-3", "--num-workers", "5"]))
    assert cfg.train.lr == 1e-3 and cfg.num_workers == 5  # flags
    assert cfg.features == "from-yaml" and cfg.train.epochs == 7 and cfg.train.eval_batch_size == 16  # YAML
    assert cfg.decoder == DecoderConfig("gru", dropout=0.3)  # YAML, other dims the reference's
    assert cfg.train.grad_clip == TrainConfig().grad_clip and cfg.storage_path == TrainJobConfig("").storage_path



def test_a_flag_in_an_either_or_group_replaces_the_files_choice(tmp_path: Path, extract_job: ModuleType) -> None:
    path = _write(tmp_path / "c.yaml", "extract:\n  coco_root: s3://b/coco\n  out: s3://b/f\n  encoder: {grid: 7}\n")
    from_file = extract_job.parse_args(["--config", str(path)])
    assert from_file.coco_root == "s3://b/coco" and from_file.encoder == EncoderConfig(grid=7)
    images = extract_job.parse_args(["--config", str(path), "--images", "s3://b/photos", "--arch", "resnet50"])
    assert images.images == "s3://b/photos" and images.coco_root is None
    assert images.encoder == EncoderConfig(arch="resnet50", grid=7)


def test_required_flags_stay_required_without_the_file(tmp_path: Path, evaluate_job: ModuleType, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        evaluate_job.parse_args(["--features", "f"])
    assert info.value.code == 2
    assert "the following arguments are required: --checkpoint" in capsys.readouterr().err
    path = _write(tmp_path / "c.yaml", "evaluate: {checkpoint: ck, features: f, beam_size: 5}\n")
    cfg = evaluate_job.parse_args(["--config", str(path), "--split", "test"])
    assert (cfg.checkpoint, cfg.split, cfg.beam_size, cfg.max_decode_len) == ("ck", "test", 5, TrainConfig().max_decode_len)


@dataclass(frozen=True)
class Toy:
    name: str
    include: tuple[str, ...] = ()
    verbose: int = 0
    dry_run: bool = False


def _toy_parser() -> JobParser:
    p = JobParser("toy", "toy")
    p.add_argument("--name", required=True)
    p.add_argument("--include", action="append", default=[])
    p.add_argument("-v", dest="verbose", action="count", default=0)
    p.add_argument("--dry-run", action="store_true")
    return p


def test_repeatable_and_counting_flags_replace_the_files_values(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "toy: {name: n, include: ['*.jpg', '*.png'], verbose: 2, dry_run: true}\n")
    assert _toy_parser().parse_config(Toy, ["--config", str(path)]) == Toy("n", ("*.jpg", "*.png"), 2, True)
    flags = ["--config", str(path), "--include", "a/*", "--include", "b/*", "-v"]
    assert _toy_parser().parse_config(Toy, flags) == Toy("n", ("a/*", "b/*"), 1, True)
    assert _toy_parser().parse_config(Toy, ["--name", "m"]) == Toy("m")


def test_help_shows_the_files_values_as_defaults(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path / "c.yaml", "toy: {name: n, include: ['*.jpg']}\n")
    with pytest.raises(SystemExit) as info:
        _toy_parser().parse_config(Toy, ["--config", str(path), "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "default: ['*.jpg']" in out and "default: n" in out


def test_unknown_keys_in_a_job_config_are_reported(tmp_path: Path) -> None:
    parser = JobParser("test", "extract")
    parser.add_argument("--out", required=True)
    path = _write(tmp_path / "c.yaml", "extract: {out: o, coco_root: c, encoder: {archh: resnet50}}\n")
    with pytest.raises(ConfigError, match="unknown key 'archh' in section extract.encoder"):
        parser.parse_config(ExtractConfig, ["--config", str(path)])


# --- configs/coco.yaml ----------------------------------------------------------------------------


def test_coco_yaml_loads_into_the_jobs_dataclasses(
    extract_job: ModuleType, train_job: ModuleType, evaluate_job: ModuleType
) -> None:
    extract = extract_job.parse_args(["--config", str(COCO_YAML)])
    assert isinstance(extract, ExtractConfig) and extract.coco_root and extract.out.startswith("s3://")
    configs = train_job.job_configs(train_job.parse_args(["--config", str(COCO_YAML)]))
    assert [c.decoder.kind for c in configs] == ["attention", "gru"]
    assert all(c.features == extract.out for c in configs)
    evaluate = evaluate_job.parse_args(["--config", str(COCO_YAML)])
    assert evaluate.features is None and evaluate.split is None  # the checkpoint's feature root and report split


def test_coco_yaml_states_the_reference_recipe() -> None:
    """The example restates the dataclasses' reference defaults: it must not drift from them."""
    extract, train = load_yaml(COCO_YAML, "extract"), load_yaml(COCO_YAML, "train")
    assert from_dict(EncoderConfig, extract["encoder"]) == EncoderConfig()  # ResNet-101, 256 px, 14 x 14
    assert EncoderConfig() == EncoderConfig("resnet101", "imagenet", 14, 256)
    assert from_dict(TrainConfig, train["train"]) == TrainConfig()
    assert (TrainConfig().lr, TrainConfig().grad_clip, TrainConfig().alpha_c) == (4e-4, 5.0, 1.0)
    dims = {k: v for k, v in train["decoder"].items() if k != "kind"}
    assert from_dict(DecoderConfig, dims) == DecoderConfig() == DecoderConfig("attention", 512, 512, 512, 0.5)


def test_coco_yaml_bulk_section_loads_into_bulk_config() -> None:
    bulk = pytest.importorskip("raycap.bulk", reason="raycap.bulk is not written yet")
    section = load_yaml(COCO_YAML, "bulk")
    assert {"source", "out", "checkpoint", "format"} <= set(section)
    from_dict(bulk.BulkConfig, section, "bulk")


# --- printing -----------------------------------------------------------------------------------


def test_print_config_redacts_secrets(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("RAYCAP_API_TOKEN", "tok-123456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    cfg = {
        "aws_secret_access_key": "plain-secret",
        "api_key": "k-1",
        "password": "hunter2",
        "env_vars": {"RAYCAP_API_TOKEN": "tok-123456"},
        "s3_endpoint": "http://alice:pa55@127.0.0.1:9000",
        "note": "signed with wJalrXUtnFEMI",
        "max_tokens": 50,  # numbers are never secrets
        "checkpoint": "s3://bucket/key/ckpt",
    }
    text = print_config("serve", cfg)
    assert capsys.readouterr().out.endswith(text)
    for secret in ("plain-secret", "k-1", "hunter2", "tok-123456", "pa55", "wJalrXUtnFEMI"):
        assert secret not in text
    loaded = yaml.safe_load(text)["serve"]
    assert loaded["s3_endpoint"] == "http://alice:***@127.0.0.1:9000"
    assert loaded["max_tokens"] == 50 and loaded["checkpoint"] == "s3://bucket/key/ckpt"


def test_printed_config_is_a_section_that_loads_back(tmp_path: Path, capsys) -> None:
    cfg = ExtractConfig(out="o", coco_root="c", encoder=EncoderConfig(grid=7), splits=("train", "test"))
    path = _write(tmp_path / "printed.yaml", print_config("extract", cfg))
    assert from_dict(ExtractConfig, load_yaml(path, "extract")) == cfg


def test_print_config_takes_pydantic_settings(capsys) -> None:
    class Settings(BaseModel):  # as raycap.serve's EncoderSettings/DecoderSettings
        checkpoint: str
        api_token: str | None = None
        max_batch_size: int = 16

    text = print_config("serve", Settings(checkpoint="s3://b/ckpt", api_token="t0k"))
    assert yaml.safe_load(text) == {"serve": {"checkpoint": "s3://b/ckpt", "api_token": "***", "max_batch_size": 16}}


# --- run_job ------------------------------------------------------------------------------------


def _exit(main, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        run_job(main)
    return info.value.code, capsys.readouterr().err


def test_run_job_exit_codes_and_messages(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _exit(lambda: None, capsys) == (0, "")

    def user_error() -> None:
        raise FileNotFoundError("no feature shards under /x: run jobs/extract_features.py first")

    assert _exit(user_error, capsys) == (1, "error: no feature shards under /x: run jobs/extract_features.py first\n")

    def in_a_ray_task() -> None:  # how Ray re-raises a task's ValueError in the driver
        cause = ValueError("bad image")
        raise RayTaskError("decode_batch", "Traceback (most recent call last): ...", cause).as_instanceof_cause()

    assert _exit(in_a_ray_task, capsys) == (1, "error: bad image\n")

    def bug() -> None:
        raise KeyError("oops")

    code, err = _exit(bug, capsys)
    assert code == 1 and "Traceback (most recent call last)" in err and err.endswith("error: KeyError: 'oops'\n")

    monkeypatch.setenv("RAYCAP_TRACEBACK", "1")
    code, err = _exit(user_error, capsys)
    assert code == 1 and "Traceback (most recent call last)" in err


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False
    )


def test_a_job_with_a_missing_input_folder_fails_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-coco"
    done = _run("jobs/extract_features.py", "--coco-root", str(missing), "--out", str(tmp_path / "features"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(missing) in last and "not found" in last
    assert done.stdout.startswith("[raycap] config:\nextract:\n")  # printed before the work starts


def test_a_job_with_a_misspelt_config_key_fails_before_starting(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "train:\n  features: f\n  train: {lr_decy: 0.5}\n")
    done = _run("jobs/train.py", "--config", str(path))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: unknown key 'lr_decy' in section train.train (did you mean 'lr_decay'?)")
    assert "Traceback" not in done.stderr
