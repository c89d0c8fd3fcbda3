"""The ``sparsetrain`` command: train, eval, report, export, list, bench.

Usage errors (bad options, unknown names, missing or corrupt data, a run folder that would
be overwritten) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import yaml

from ..data import DATASET_NAMES, BatchLoader, load_dataset
from ..declare import declared
from ..methods import list_methods, method_spec
from ..models import create_model, input_size, list_models
from ..report import size_report, sparsity_report
from .bench import DEFAULT_METHODS, axis_values, check_grid, grid_axes, grid_cells, run_grid
from .checkpoint import load_weights
from .export import save_sparse
from .flags import MethodFlag, method_flags
from .folder import CONFIG, MODEL, RUN_FILES, RunFolder, final_weights, load_run, nm_pattern
from .loop import EVAL_BATCH_SIZE, evaluate, fit, method_title, prepare
from .onnx import export_onnx, onnxruntime_difference
from .options import TrainOptions, check_path_length, list_recipes, options_from_dict, resolve_device, text_value

USAGE_ERROR = 2
FAILURE = 1  # a run that cannot go on (it diverged); its last good checkpoint is kept
EXPORT_FORMATS = ("sparse", "onnx")


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, text_value(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsetrain", description="Sparsify neural networks during training.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model while sparsifying it")
    _add_training_options(train, single_run=True)
    s = argparse.SUPPRESS
    run = train.add_argument_group("run")
    run.add_argument("--name", "--sname", dest="name", default=s, help="run name (default: model-method-sparsity-time)")
    run.add_argument("--out", default=s, help="folder of run folders; default runs")
    run.add_argument("--config", default=s, help="YAML or TOML file of these options; command-line options win")
    run.add_argument("--resume", metavar="RUN_DIR", default=s, help="continue the run in RUN_DIR from its last checkpoint")

    evaluate_cmd = commands.add_parser("eval", help="evaluate a finished run or a checkpoint on its test set")
    evaluate_cmd.add_argument("path", help="run folder, model.safetensors or checkpoint.safetensors")
    evaluate_cmd.add_argument("--data-dir", help="override the run's data folder")
    evaluate_cmd.add_argument("--device", default="auto")

    report = commands.add_parser("report", help="print a run's per-layer sparsity table")
    report.add_argument("path", help="run folder, model.safetensors or checkpoint.safetensors")

    bench = commands.add_parser("bench", help="train the grid of methods x sparsities x seeds and tabulate accuracy")
    grid = bench.add_argument_group("grid")
    grid.add_argument("--methods", type=_name_list, default=list(DEFAULT_METHODS),
                      help="comma-separated methods; the dense reference always runs")
    for axis, flag in grid_axes().items():
        grid.add_argument(f"--{axis}", dest=_dest(axis), type=_float_list if flag.option.kind is float else _name_list,
                          default=list(axis_values(flag)), help=f"{flag.help}: comma-separated values, one "
                          f"grid column each; default {','.join(map(str, axis_values(flag)))}".replace("%", "%%"))
    grid.add_argument("--seeds", type=_int_list, default=[0, 1], help="comma-separated")
    grid.add_argument("--out", default="bench", help="grid folder; re-running it skips finished cells")
    _add_training_options(bench, single_run=False)

    export = commands.add_parser("export", help="write a run's final model: compressed weights or ONNX")
    export.add_argument("path", help="run folder")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="sparse",
                        help="sparse: the weights' non-zeros in safetensors (default); onnx: the model as ONNX")
    export.add_argument("--out", help="output file (default: RUN_DIR/model.sparse.safetensors or RUN_DIR/model.onnx)")
    export.add_argument("--force", action="store_true", help="replace the output file if it exists")

    listing = commands.add_parser("list", help="list models, methods and datasets; with a method, its options")
    listing.add_argument("method", nargs="?", help="a method: each of its options with its flag, default, allowed values and meaning")
    return parser


def _list_of(kind: type, what: str):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None

    return parse


_name_list, _float_list, _int_list = _list_of(str, "names"), _list_of(float, "numbers"), _list_of(int, "integers")


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() == "true"


_FLAG_TYPES: dict[type, Callable[[str], Any]] = {int: int, float: float, str: str, bool: _bool}


def _flag_help(flag: MethodFlag) -> str:
    """What a method flag sets, in which units, for which methods."""
    methods = list(flag.takes)
    who = ", ".join(methods) if len(methods) <= 3 else f"{len(methods)} methods: {methods[0]}, {methods[1]}, ..."
    units = " (epochs)" if flag.epochs else ""
    return f"{flag.help}{units} [{who}]".replace("%", "%%")


def _dest(axis: str) -> str:
    return "axis_" + axis.replace("-", "_")


def _add_training_options(parser: argparse.ArgumentParser, single_run: bool) -> None:
    """The recipe options; a single run also chooses its method, sparsity and seed."""
    s = argparse.SUPPRESS  # options not given stay absent, so a config file or the defaults supply them
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", default=s, help=f"model name ({', '.join(list_models())})")
    what.add_argument("--model-arg", dest="model_args", type=_key_value, action="append", default=s,
                      metavar="KEY=VALUE", help="model constructor argument, e.g. width=0.5 (repeatable)")
    what.add_argument("--dataset", default=s, help=f"dataset ({', '.join(DATASET_NAMES)}); default cifar10-sample")
    what.add_argument("--data-dir", default=s, help="folder holding cifar-10-batches-py or cifar-100-python")
    what.add_argument("--limit", type=int, default=s, help="train on the first N training images only")
    how = parser.add_argument_group("sparsification")
    if single_run:
        how.add_argument("--method", default=s, help=f"{', '.join(list_methods())}; default feather")
    how.add_argument("--method-arg", dest="method_args", type=_key_value, action="append", default=s,
                     metavar="KEY=VALUE", help="any option of the method (sparsetrain list), e.g. theta=0.5 (repeatable)")
    flags = parser.add_argument_group("method options", "set the option of every method that takes it (sparsetrain list)")
    for key, flag in method_flags().items():
        if single_run or flag.axis is None:  # bench varies an axis through its list (--sparsities, ...)
            names = [f"--{name.replace('_', '-')}" for name in (key, *flag.aliases)]
            flags.add_argument(*names, dest=key, type=_FLAG_TYPES.get(flag.kind, text_value), default=s,
                               help=_flag_help(flag))
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=int, default=s, help="default 12 on the bundled sample, 160 on CIFAR")
    recipe.add_argument("--batch-size", type=int, default=s, help="per process; default 128")
    recipe.add_argument("--lr", type=float, default=s, help="default 0.1, cosine decay per step")
    recipe.add_argument("--wd", type=float, default=s, help="weight decay on conv/linear weights; default 5e-4")
    recipe.add_argument("--momentum", type=float, default=s, help="default 0.9")
    recipe.add_argument("--clip", type=float, default=s, help="gradient-norm clipping; default 3")
    recipe.add_argument("--recipe", default=s, help=f"a paper's recipe ({', '.join(list_recipes())}"
                        + ("; 'paper': each method its own paper's" if not single_run else "") + "); options given win")
    recipe.add_argument("--lr-schedule", default=s, help="cosine (per step, default) or multistep")
    recipe.add_argument("--milestones", type=_int_list, default=s, help="multistep: epochs at which lr is multiplied by --gamma")
    recipe.add_argument("--gamma", type=float, default=s, help="multistep factor; default 0.1")
    recipe.add_argument("--warmup", type=int, default=s, help="epochs of linear learning-rate warm-up; default 0")
    recipe.add_argument("--label-smoothing", type=float, default=s, help="default 0")
    if single_run:
        recipe.add_argument("--seed", type=int, default=s, help="default 0")
    device = parser.add_argument_group("device")
    device.add_argument("--device", default=s, help="auto, cpu, cuda or cuda:N; default auto")
    device.add_argument("--workers", type=int, default=s, help="CPU threads for torch (0: torch's default)")
    if single_run:
        device.add_argument("--fsdp", action="store_true", default=s,
                            help="under torchrun: shard the model with FSDP2 (fully_shard) instead of DDP "
                                 "(unstructured and N:M methods)")


MAX_CONFIG_BYTES = 1 << 20


class _PlainYAMLLoader(yaml.SafeLoader):
    """YAML without aliases: a few bytes of nested aliases would expand into gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise UsageError(f"config file {self.name} uses a YAML alias at line {mark.line + 1}; allowed: plain values")
        return super().compose_node(parent, index)


def read_config_file(path: str) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml, without aliases) or TOML (.toml) file of at most 1 MiB."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path} does not exist")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise UsageError(f"config file {path} holds {file.stat().st_size} bytes; allowed: at most {MAX_CONFIG_BYTES}")
    try:
        if file.suffix == ".toml":
            values = tomllib.loads(file.read_text())
        elif file.suffix in (".yaml", ".yml"):
            loader = _PlainYAMLLoader(file.read_text())
            loader.name = path
            try:
                values = loader.get_single_data() or {}
            finally:
                loader.dispose()
        else:
            raise UsageError(f"config file {path} must end in .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"config file {path} is not valid: {str(error).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of option names to values")
    return values


def train_options(args: dict[str, Any]) -> tuple[TrainOptions, bool]:
    """Merge defaults, the config file and the command line; or reload a run to resume."""
    if "resume" in args:
        run_dir = Path(args.pop("resume"))
        folder = RunFolder(run_dir)
        if not folder.has_config():
            raise UsageError(f"cannot resume {run_dir}: it has no {CONFIG}")
        saved = folder.saved_options()
        extra = sorted(set(args) - {"device", "workers"})
        if extra:
            raise UsageError(f"--{extra[0].replace('_', '-')} cannot change when resuming; a resumed run keeps its options")
        saved.update(args, out=str(run_dir.parent), name=run_dir.name)
        return options_from_dict(saved), True
    values = read_config_file(args.pop("config")) if "config" in args else {}
    _pairs_to_dicts(args)
    values.update(args)
    return options_from_dict(values), False


def _pairs_to_dicts(args: dict[str, Any]) -> None:
    """--model-arg and --method-arg pairs become mappings."""
    for key in ("model_args", "method_args"):
        if key in args:
            args[key] = dict(args[key])


def command_eval(path: str, data_dir: str | None, device_spec: str) -> None:
    device = resolve_device(device_spec)
    run = load_run(path, device)
    options = run.config["options"]
    data = load_dataset(options["dataset"], data_dir or options["data_dir"])
    loader = BatchLoader(data.x_test, data.y_test, EVAL_BATCH_SIZE, data.mean, data.std, shuffle=False, device=device)
    loss, accuracy = evaluate(run.model, loader)
    report = sparsity_report(run.model)
    print(f"test acc {accuracy:.2%}  test loss {loss:.4f}  sparsity {report.sparsity:.2%}  ({len(data.y_test)} images)")


def _export_target(weights: Path, out: str | None, default: str, force: bool) -> Path:
    """Where an export goes: ``out`` or ``default`` beside the weights, a file in an existing folder,
    never onto a file of the run, and onto another existing file only with ``force``."""
    target = Path(out) if out else weights.with_name(default)
    check_path_length("--out", str(target))
    if target.resolve() in {weights.with_name(name).resolve() for name in RUN_FILES}:
        raise UsageError(f"--out {target} is a file of the run itself; allowed: another path")
    if not target.parent.is_dir():
        raise UsageError(f"--out {target}: the folder {target.parent} does not exist; allowed: a file in an existing folder")
    if target.is_dir():
        raise UsageError(f"--out {target} is a folder; allowed: a file path")
    if target.exists() and not force:
        raise UsageError(f"--out {target} exists; allowed: another path, or --force to replace it")
    return target


def command_export(path: str, out: str | None, export_format: str, force: bool = False) -> None:
    if export_format == "onnx":
        return export_onnx_command(path, out, force)
    weights = final_weights(path)
    target = _export_target(weights, out, "model.sparse.safetensors", force)
    save_sparse(target, load_weights(weights), nm=nm_pattern(RunFolder(weights.parent).config()))
    before, after = weights.stat().st_size, target.stat().st_size
    print(f"wrote {target}: {after / 1024:.0f} KiB, {after / before:.1%} of {MODEL} ({before / 1024:.0f} KiB)")


def export_onnx_command(path: str, out: str | None, force: bool = False) -> None:
    weights = final_weights(path)
    target = _export_target(weights, out, "model.onnx", force)
    run = load_run(weights, torch.device("cpu"))
    example = torch.zeros(2, *input_size(run.config["model"]["name"]))
    export_onnx(run.model, example, target)
    line = f"wrote {target}: {target.stat().st_size / 1024:.0f} KiB"
    difference = onnxruntime_difference(run.model, target, torch.randn(4, *example.shape[1:]))
    if difference is not None:
        line += f"; onnxruntime matches PyTorch to {difference:.1e} (max |difference| of the logits)"
    print(line)


def command_report(path: str) -> None:
    run = load_run(path, torch.device("cpu"))
    name, method = run.config["model"]["name"], run.config["method"]
    print(f"{name} · {method_title(method['name'], method['options'])}\n")
    print(sparsity_report(run.model, nm=run.nm).to_markdown() + "\n")
    if run.method is None:  # a finished model: sizes before and after
        example = torch.zeros(1, *input_size(name))
        print(size_report(create_model(name, **run.config["model"]["kwargs"]), run.model, example))


def command_list(method: str | None = None) -> None:
    if method is not None:
        command_list_method(method)
        return
    print("models:   " + ", ".join(list_models()))
    print("datasets: " + ", ".join(DATASET_NAMES))
    print("recipes:  " + ", ".join(list_recipes()))
    print("methods:")
    for name, defaults in list_methods().items():
        print(f"  {name:<10} {method_spec(name).summary}")
        if defaults:
            print("  " + " " * 10 + " options: " + ", ".join(f"{key}={value!r}" for key, value in defaults.items()))


def command_list_method(method: str) -> None:
    """Each declared option of ``method``: its name, the flag that sets it, its default, what it allows, what it means."""
    spec = method_spec(method)
    flags = {flag.takes[method]: flag for flag in method_flags().values() if method in flag.takes}
    defaults = spec.defaults()
    print(f"{method}: {spec.summary}")
    for name, option, _ in declared(spec.options):
        flag = flags.get(name)
        how = f"--{flag.key.replace('_', '-')}" + (" (epochs)" if flag.epochs else "") if flag else f"--method-arg {name}=..."
        print(f"  {name:<18} {how:<26} default {option.shown_value(defaults[name])!r}; allowed: {option.allowed_text()}")
        print(f"  {'':<18} {option.help}")


def _checked_command(args: dict[str, Any]) -> Callable[[], None]:
    """Validate the request (usage errors raise here, before anything is written) and return the work."""
    command = args.pop("command")
    if command == "train":
        options, resume = train_options(args)
        setup = prepare(options, resume)
        return lambda: fit(setup)
    if command == "bench":
        grid = {key: args.pop(key) for key in ("methods", "seeds", "out")}
        values = {axis: args.pop(_dest(axis)) for axis in grid_axes()}
        _pairs_to_dicts(args)
        cells = grid_cells(grid["methods"], grid["seeds"], values)
        check_grid(args, cells, grid["out"])
        return lambda: run_grid(args, cells, grid["out"])
    if command == "eval":
        command_eval(args["path"], args["data_dir"], args["device"])
    elif command == "export":
        command_export(args["path"], args["out"], args["format"], args["force"])
    elif command == "report":
        command_report(args["path"])
    else:
        command_list(args.get("method"))
    return lambda: None


def _say(error: BaseException | str) -> None:
    """The one error line; a message longer than 400 characters keeps its start and its end."""
    text = " ".join(str(error).split())
    if len(text) > 400:
        text = f"{text[:240]} … {text[-150:]}"
    print(f"sparsetrain: error: {text}", file=sys.stderr)


def _io_failure(error: OSError) -> str:
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}; files already written are kept (a run resumes from its last checkpoint)"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        work = _checked_command(vars(build_parser().parse_args(argv)))
    except (UsageError, ValueError) as error:
        _say(error)
        return USAGE_ERROR
    except OSError as error:  # a file that cannot be read or written: disk full, read-only, ...
        _say(_io_failure(error))
        return FAILURE
    try:
        work()
    except FloatingPointError as error:  # the run diverged: not a usage error
        _say(error)
        return FAILURE
    except OSError as error:
        _say(_io_failure(error))
        return FAILURE
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
