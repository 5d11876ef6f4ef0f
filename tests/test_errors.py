"""One error family: library code raises an `OdirError` subclass and never ends the process; only the scripts'
entry points (common.cli.run_cli) turn an error into one line and an exit status (docs/data.md, "Exit statuses")."""
from __future__ import annotations

import ast
import importlib
import inspect

import pytest

from odir_dual.common.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE, NothingToRun, Terminated, UsageError, run_cli
from odir_dual.common.errors import OdirError
from test_layout import PACKAGES, project_modules

LIBRARY = [(name, path) for name, path in project_modules().items() if name.split(".")[1] in PACKAGES]
NOT_ERRORS = {Terminated}  # SIGTERM as an exception, like KeyboardInterrupt: a BaseException on purpose


def test_every_project_exception_derives_from_odir_error():
    """A new error class without the base fails here (and would escape run_cli as a traceback)."""
    found = []
    for name in project_modules():
        for _, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException) and cls not in NOT_ERRORS:
                found.append(cls)
                assert issubclass(cls, OdirError), f"{name}.{cls.__name__} does not derive from OdirError"
    names = {cls.__name__ for cls in found}
    assert {"CheckpointError", "DataError", "SheetError", "ConfigError", "ScoreError", "OutputError"} <= names


def _exits(tree: ast.AST):
    """(line, what) of each `raise SystemExit`, `sys.exit(...)`, `exit(...)` and `quit(...)` outside an
    `if __name__ == "__main__":` block (a module's own command line, e.g. python -m pipeline.prepare). `os._exit` is
    not looked for: pipeline/prepare.py's pool workers end themselves with it when their parent is gone."""
    def main_block(node):
        return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")

    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                yield node.lineno, "raise SystemExit"
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                    and (f.value.id, f.attr) == ("sys", "exit")):
                yield node.lineno, f"{f.value.id}.{f.attr}()"
            elif isinstance(f, ast.Name) and f.id in ("exit", "quit"):
                yield node.lineno, f"{f.id}()"
        todo.extend(child for child in ast.iter_child_nodes(node) if not main_block(child))


@pytest.mark.parametrize("name, path", LIBRARY, ids=[name for name, _ in LIBRARY])
def test_library_modules_never_end_the_process(name, path):
    found = list(_exits(ast.parse(path.read_text(), str(path))))
    assert not found, f"{path.relative_to(path.parents[1])}: {found}: raise an OdirError subclass instead"


def test_the_exit_check_sees_through_comments_and_main_blocks():
    code = ('# raise SystemExit in a comment\nx = "sys.exit(1)"\nif __name__ == "__main__":\n    sys.exit(main())\n'
            'def f():\n    raise SystemExit("no")\ndef g():\n    sys.exit(2)\n')
    assert sorted(_exits(ast.parse(code))) == [(6, "raise SystemExit"), (8, "sys.exit()")]


# ----------------------------------------------------------------------------------------------- README "Use as a library"


def _train_main(argv):
    from odir_dual.train import main

    return main(argv)


def _readme_calls(tmp_path):
    """Each entry point of README "Use as a library" with bad input: (what, call, the error it must raise)."""
    from odir_dual.deploy.runtime import ModelFileError, load_session
    from odir_dual.export import export
    from odir_dual.pipeline.odir import DataFolderError, read_patients
    from odir_dual.pipeline.pairs import NamePattern, PatternError
    from odir_dual.pipeline.split import SplitError, load_split
    from odir_dual.training.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
    from odir_dual.training.config import ConfigError, config_from_dict, parse_config

    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    onnx = tmp_path / "junk.onnx"
    onnx.write_bytes(b"\x00not onnx")
    (tmp_path / "empty").mkdir()
    split = tmp_path / "split.csv"
    split.write_text("id,split\n1,train\n2,holdout\n")
    return [
        ("read_checkpoint(junk)", lambda: read_checkpoint(junk), CheckpointError),
        ("read_checkpoint(missing)", lambda: read_checkpoint(tmp_path / "missing.pt"), CheckpointError),
        ("model_from_checkpoint({})", lambda: model_from_checkpoint({}), CheckpointError),
        ("load_session(junk)", lambda: load_session(onnx), ModelFileError),
        ("read_patients(empty folder)", lambda: read_patients(tmp_path / "empty"), DataFolderError),
        ("read_patients(missing)", lambda: read_patients(tmp_path / "missing"), DataFolderError),
        ("export(junk)", lambda: export(junk, tmp_path / "out.onnx"), CheckpointError),
        ("config_from_dict(bad kind)", lambda: config_from_dict({"img_px": "big"}), ConfigError),
        ("parse_config(unknown flag)", lambda: parse_config(["--epcohs", "3"]), UsageError),
        ("parse_config(bad value)", lambda: parse_config(["--ensemble", "0"]), ConfigError),
        ("parse_config(--help)", lambda: parse_config(["--help"]), NothingToRun),
        ("parse_config(--print-config)", lambda: parse_config(["--print-config"]), NothingToRun),
        ("load_split(bad row)", lambda: load_split(split), SplitError),
        ("NamePattern(no {eye})", lambda: NamePattern("{id}.jpg"), PatternError),
        ("train.main(unknown flag)", lambda: _train_main(["--bogus"]), UsageError),
        ("train.main(no data there)", lambda: _train_main(["--data", str(tmp_path / "missing"), "--dry-run",
                                                           "--out", str(tmp_path / "runs")]), DataFolderError),
    ]


def test_readme_library_entry_points_raise_odir_errors_never_exit(tmp_path, capsys):
    """A notebook calling the README's library entry points with bad input catches `OdirError` and goes on;
    pytest.raises lets a SystemExit through, which fails the test."""
    for what, call, expected in _readme_calls(tmp_path):
        with pytest.raises(OdirError) as e:
            call()
        assert isinstance(e.value, expected), f"{what}: {type(e.value).__name__}: {e.value}"
        assert str(e.value).strip() or expected is NothingToRun, what
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "runs").exists()


def test_run_cli_turns_the_family_into_one_line_and_the_documented_statuses(capsys):
    from odir_dual.training.config import ConfigError, parse_config

    def bad():
        raise ConfigError("--ensemble 0: at least 1 network")

    assert run_cli(bad, "train.py") == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "train.py: error: --ensemble 0: at least 1 network\n"
    assert run_cli(lambda: parse_config(["--epcohs", "3"]), "train.py") == EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("train.py: error: unknown flag --epcohs; did you mean --epochs")
    assert err[-1] == "python train.py --help lists every flag"
    assert run_cli(lambda: parse_config(["--help"]), "train.py") == EXIT_OK
    assert "--epochs N" in capsys.readouterr().out
