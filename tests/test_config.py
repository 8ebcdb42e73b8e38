"""raycap.config: YAML sections into the library's dataclasses, flag precedence, errors, redaction,
and the jobs' exit codes and messages."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import typing
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from pydantic import BaseModel
from ray.exceptions import RayTaskError

from raycap import storage
from raycap.bulk import BulkConfig
from raycap.config import ConfigError, JobParser, flag_kind, from_dict, load_yaml, print_config, run_job
from raycap.data import synthetic
from raycap.demo import DemoConfig
from raycap.evaluate import EvaluateConfig
from raycap.features import ExtractConfig
from raycap.models.decoders import DecoderConfig
from raycap.models.encoder_config import EncoderConfig
from raycap.recipe import TrainConfig
from raycap.serve_schema import SERVE_CONFIG
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


@pytest.mark.integration
def test_s3_endpoint_flag_alone_reads_a_config_in_a_bucket(
    s3_server, train_job: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.make_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="train.yaml", Body=b"train:\n  features: s3://data/features\n")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv(storage.ENDPOINT_ENV, "")  # unset, and restored after the flag sets it
    argv = ["--config", f"s3://{bucket}/train.yaml", "--s3-endpoint", s3_server.endpoint_url]
    values = train_job.parse_args(argv)
    assert values["features"] == "s3://data/features" and "s3_endpoint" not in values  # process config, no field
    assert storage.worker_env() == {storage.ENDPOINT_ENV: s3_server.endpoint_url}  # for init_ray's workers


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
    assert info.value.code == 1
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
    p = JobParser("toy", "toy", Toy)  # flags added by hand: Toy's fields declare none
    p.add_argument("--name", required=True)
    p.add_argument("--include", action="append", default=[])
    p.add_argument("-v", dest="verbose", action="count", default=0)
    p.add_argument("--dry-run", action="store_true")
    return p


def test_repeatable_and_counting_flags_replace_the_files_values(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "toy: {name: n, include: ['*.jpg', '*.png'], verbose: 2, dry_run: true}\n")
    assert _toy_parser().parse_config(["--config", str(path)]) == Toy("n", ("*.jpg", "*.png"), 2, True)
    flags = ["--config", str(path), "--include", "a/*", "--include", "b/*", "-v"]
    assert _toy_parser().parse_config(flags) == Toy("n", ("a/*", "b/*"), 1, True)
    assert _toy_parser().parse_config(["--name", "m"]) == Toy("m")


def test_help_shows_the_files_values_as_defaults(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path / "c.yaml", "toy: {name: n, include: ['*.jpg']}\n")
    with pytest.raises(SystemExit) as info:
        _toy_parser().parse_config(["--config", str(path), "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "default: ['*.jpg']" in out and "default: n" in out


def test_unknown_keys_in_a_job_config_are_reported(tmp_path: Path) -> None:
    parser = JobParser("test", "extract", ExtractConfig)
    path = _write(tmp_path / "c.yaml", "extract: {out: o, coco_root: c, encoder: {archh: resnet50}}\n")
    with pytest.raises(ConfigError, match="unknown key 'archh' in section extract.encoder"):
        parser.parse_config(["--config", str(path)])


# --- flags derived from the dataclasses ----------------------------------------------------------

JOB_CONFIGS = {"extract": ExtractConfig, "train": TrainJobConfig, "evaluate": EvaluateConfig, "bulk": BulkConfig,
               "demo": DemoConfig}  # fmt: skip
PROCESS_FLAGS = {"-h", "--help", "--config", "--s3-endpoint", "--verbose"}  # every job's, no field's
# The jobs' flags, as named when they were written by hand: users' scripts call them by these names
# (a new flag joins the list; a renamed one breaks those scripts).
FLAG_NAMES = {
    "extract": "--out --coco-root --images --karpathy-file --splits --year --images-split --arch --weights --grid "
    "--image-size --dtype --stored-grid --batch-size --encoders --encoder-cpus --torch-threads --decode-batch-size "
    "--decode-cpus --rows-per-shard --limit --min-freq --max-words",
    "train": "--features --model --embed-dim --decoder-dim --attention-dim --dropout --epochs --captions-per-step --lr "
    "--lr-rule --warmup-epochs --grad-clip --alpha-c --lr-decay --decay-patience --early-stop-patience --beam-size "
    "--seed --num-workers --use-gpu --no-use-gpu --cpus-per-worker --captions-per-image --train-splits --select-split "
    "--report-split --storage-path --run-name --resume --max-failures",
    "evaluate": "--checkpoint --features --split --out --beam-size --max-decode-len --allow-unk --pictures "
    "--compare --allow-train-overlap --official",
    "bulk": "--source --out --checkpoint --model --serve-config --app-name --http-port --format --include --exclude --limit "
    "--dry-run --beam-size --read-batch-size --clients --in-flight --retries --rows-per-shard",
    "demo": "--out --train --val --seed --epochs --captions-per-step --num-workers",
}


def _fields(cls: type, prefix: str = "") -> Iterator[tuple[str, str | None]]:
    """(dotted name, flag_kind) of every field of a job config, nested ones' fields instead of them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if flag_kind(f) == "nested":
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", flag_kind(f)


@pytest.mark.parametrize("section", JOB_CONFIGS)
def test_every_field_has_exactly_one_flag_or_is_file_only(section: str) -> None:
    fields = dict(_fields(JOB_CONFIGS[section]))
    undeclared = [name for name, kind in fields.items() if kind is None]
    assert not undeclared, f"{section}: declare each field with flag(...), nested(...) or file_only(...): {undeclared}"
    parser = JobParser(None, section, JOB_CONFIGS[section])
    dests = Counter(a.dest for a in parser._actions if not set(a.option_strings) & PROCESS_FLAGS)
    assert dests == Counter(name for name, kind in fields.items() if kind == "flag")  # one each, no other


@pytest.mark.parametrize("section", JOB_CONFIGS)
def test_the_jobs_keep_their_flag_names(section: str) -> None:
    parser = JobParser(None, section, JOB_CONFIGS[section])
    names = {name for a in parser._actions for name in a.option_strings} - PROCESS_FLAGS
    assert names == set(FLAG_NAMES[section].split())


def test_flags_default_to_the_dataclass_and_keep_the_hints_types(extract_job: ModuleType) -> None:
    cfg = extract_job.parse_args(["--images", "i", "--out", "o", "--splits", "val", "test", "--encoder-cpus", "2",
                                  "--encoders", "3", "--grid", "7"])  # fmt: skip
    assert cfg == ExtractConfig(out="o", images="i", splits=("val", "test"), encoder_cpus=2.0, num_encoders=3,
                                encoder=EncoderConfig(grid=7))  # fmt: skip
    with pytest.raises(SystemExit):  # the Literal's choices
        JobParser(None, "bulk", BulkConfig).parse_config(["--source", "s", "--out", "o", "--format", "csv"])


def test_an_override_for_a_flag_the_dataclass_lacks_is_an_error() -> None:
    with pytest.raises(ValueError, match="TrainJobConfig has no flag for the overrides of decoder.knd"):
        JobParser(None, "train", TrainJobConfig, overrides={"decoder.knd": {"default": "both"}})


@pytest.mark.parametrize("argv", [["--epoch", "3"], ["--conf", "c.yaml"], ["--s3", "http://127.0.0.1:1"]])
def test_abbreviated_flags_are_refused(argv: list[str], train_job: ModuleType, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        train_job.parse_args(["--features", "f", *argv])
    assert info.value.code == 1
    assert f"unrecognized arguments: {' '.join(argv)}" in capsys.readouterr().err


def _help(parse, monkeypatch: pytest.MonkeyPatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps help at $COLUMNS
    with pytest.raises(SystemExit) as info:
        parse(["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _entries(help_text: str) -> dict[str, str]:
    """Each flag's entry in --help: its line and the indented lines that continue it."""
    entries: dict[str, str] = {}
    name = None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            entries[name] = line
        elif name is not None and line.startswith("   "):
            entries[name] += " " + line.strip()
        else:
            name = None
    return entries


@pytest.mark.parametrize("section", JOB_CONFIGS)
def test_help_shows_every_flags_default(section: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    parser = JobParser(None, section, JOB_CONFIGS[section])
    entries = _entries(_help(parser.parse_values, monkeypatch, capsys))
    shown = [a for a in parser._actions if a.default is not None and not set(a.option_strings) & PROCESS_FLAGS]
    assert len(shown) > 3
    for action in shown:
        assert f"default: {action.default}" in entries[action.option_strings[0]]


def test_the_serve_job_takes_s3_endpoint_and_its_own_config_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.ENDPOINT_ENV, "")  # unset, and restored after the flag sets it
    args = _job("serve").parse_args(["--checkpoint", "s3://b/ckpt", "--s3-endpoint", "http://127.0.0.1:9"])
    assert (args.checkpoint, args.config, args.port, args.address) == ("s3://b/ckpt", SERVE_CONFIG, None, None)
    assert storage.endpoint() == "http://127.0.0.1:9"


def test_serve_and_synthetic_help_show_defaults(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    serve = " ".join(_help(_job("serve").parse_args, monkeypatch, capsys).split())
    assert f"Serve config file (ServeDeploySchema) (default: {SERVE_CONFIG})" in serve
    assert "--s3-endpoint URL" in serve
    made = " ".join(_help(synthetic.main, monkeypatch, capsys).split())
    assert "number of train2017 images (default: 400)" in made and "(default: 0)" in made


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
        "url": "http://alice:pa55@127.0.0.1:9000",
        "note": "signed with wJalrXUtnFEMI",
        "max_tokens": 50,  # numbers are never secrets
        "checkpoint": "s3://bucket/key/ckpt",
    }
    text = print_config("serve", cfg)
    assert capsys.readouterr().out.endswith(text)
    for secret in ("plain-secret", "k-1", "hunter2", "tok-123456", "pa55", "wJalrXUtnFEMI"):
        assert secret not in text
    loaded = yaml.safe_load(text)["serve"]
    assert loaded["url"] == "http://alice:***@127.0.0.1:9000"
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
