"""What the user sees under ``accelerate launch``: a bad input is the last line, with no traceback; one output dir
holds one run; CPU runs use the machine's cores. Every test here launches the real CLI as a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _accelerate import REPO, TINY_PRETRAIN, finish, free_port, last_line, run, start

from lmkit import errors, launcher, runtime
from lmkit.args import BUNDLED_CORPUS
from lmkit.errors import LMKitError
from lmkit.lock import LOCK_NAME, OutputDirLock

CORPUS = BUNDLED_CORPUS.read_text(encoding="utf-8")[:30000]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.py"))


def _assert_one_line_last(code: int, output: str, fragment: str) -> None:
    assert code != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert last_line(output).startswith("lmkit: error: ") and fragment in last_line(output), output[-3000:]
    assert output.count("lmkit: error:") == 1, output[-3000:]  # one report, even from several ranks


# -- one line, last ------------------------------------------------------------------------------------------------
def test_bad_inputs_end_in_one_line_under_accelerate_launch(tmp_path):
    """A representative set, all launched at once: a flag error before anything starts, a file error found by rank 0
    while rank 1 waits at a barrier (2 processes, torchrun's agent), a fine-tuning error, a thread count that is not
    a positive integer, and a multi-machine config whose processes each came up alone."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    two = ("--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()))  # fmt: skip
    alone = ("--config_file", str(REPO / "accelerate_configs" / "multi_node.yaml"), "--cpu",
             "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()))  # fmt: skip
    cases = {
        "flag": (("pretrain", "--learning_rate", "-1"), (), "--learning_rate must be positive"),
        "data-2proc": (("pretrain", *TINY_PRETRAIN, "--train_files", str(tmp_path / "nope.txt"), "--output_dir",
                        str(tmp_path / "o1")), two, "nope.txt"),
        "finetune": (("finetune", "--model_name_or_path", str(tmp_path / "no-model"), "--train_files", str(corpus),
                      "--output_dir", str(tmp_path / "o2")), (), "no-model"),
        "threads": (("pretrain", "--num_threads", "0", "--output_dir", str(tmp_path / "o3")), (),
                    "--num_threads must be a positive integer"),
        "came-up-alone": (("pretrain", *TINY_PRETRAIN, "--train_files", str(corpus), "--output_dir",
                           str(tmp_path / "o4")), alone, "came up alone in a world of size 1"),
    }  # fmt: skip
    procs = {name: start(*argv, cwd=tmp_path, launcher_args=la) for name, (argv, la, _) in cases.items()}
    for name, proc in procs.items():
        code, output = finish(proc, timeout=300)
        _assert_one_line_last(code, output, cases[name][2])
    for out in ("o1", "o2", "o3", "o4"):  # nothing was left behind
        assert not (tmp_path / out).exists()


def _fake_launcher(monkeypatch, terminated_during_grace: bool) -> list:
    """Run `errors.exit_with_error` against a pretend launcher (pid 4242): record what it does, in order. The
    launcher's SIGTERM arrives during the first grace sleep, or never."""
    events: list = []
    handler = {}
    monkeypatch.setattr(errors, "_accelerate_is_quiet_on_sigterm", lambda: True)
    monkeypatch.setattr(errors, "accelerate_launcher_pid", lambda: 4242)
    monkeypatch.setattr(errors, "live_siblings", lambda: [])
    monkeypatch.setattr(errors, "_claim_report", lambda pid: events.append(("claim", pid)) or True)
    monkeypatch.setattr(errors.os, "kill", lambda pid, sig: events.append(("kill", pid, sig)))
    monkeypatch.setattr(errors.signal, "signal", lambda sig, fn: handler.update(fn=fn))

    def exit_(code):
        events.append(("exit", code))
        raise SystemExit(code)

    def sleep(seconds):
        events.append(("sleep", seconds))
        if terminated_during_grace:
            handler["fn"](signal.SIGTERM, None)

    monkeypatch.setattr(errors.os, "_exit", exit_)
    monkeypatch.setattr(errors.time, "sleep", sleep)
    return events


@pytest.mark.parametrize("terminated", [True, False], ids=["launcher-stops-it", "nobody-reported"])
def test_a_relayed_error_leaves_the_report_to_the_process_that_failed(monkeypatch, capsys, terminated):
    """A rank that raises another process's error (`RelayedError`) neither claims the report nor stops the launcher
    at once: the process that failed reports, after releasing what it holds (a race that left an empty output dir
    behind when the waiting rank won). If no one has stopped it after the grace period, it reports itself."""
    grace = errors.LAUNCHER_GRACE_SECONDS
    events = _fake_launcher(monkeypatch, terminated)
    with pytest.raises(SystemExit):
        errors.exit_with_error("lmkit: error: --train_files x: no such file", relayed=True)
    if terminated:
        assert events == [("sleep", grace), ("exit", 2)]
        assert capsys.readouterr().err == ""
    else:
        assert events == [("sleep", grace), ("claim", 4242), ("kill", 4242, signal.SIGTERM), ("sleep", grace),
                          ("exit", 2)]  # fmt: skip
        assert capsys.readouterr().err == "lmkit: error: --train_files x: no such file\n"


def test_the_failing_process_reports_at_once(monkeypatch, capsys):
    events = _fake_launcher(monkeypatch, terminated_during_grace=True)
    with pytest.raises(SystemExit):
        errors.exit_with_error("lmkit: error: --train_files x: no such file")
    grace = errors.LAUNCHER_GRACE_SECONDS
    assert events == [("claim", 4242), ("kill", 4242, signal.SIGTERM), ("sleep", grace), ("exit", 2)]
    assert capsys.readouterr().err == "lmkit: error: --train_files x: no such file\n"


def test_a_waiting_rank_raises_the_main_process_error_as_relayed(tmp_path):
    """The marker of a main process that failed on a user error gives the waiting ranks the same message, so
    whichever rank reports, the line is the user's; any other failure names the marker and the error."""
    from lmkit.distributed import _wait_for_marker, _write_marker

    marker = tmp_path / "m.done"
    _write_marker(marker, "error: LMKitError: --train_files x: no such file")
    with pytest.raises(errors.RelayedError) as raised:
        _wait_for_marker(marker, os.getpid(), "load corpus")
    assert str(raised.value) == "--train_files x: no such file"
    _write_marker(marker, "error: ValueError: boom")
    with pytest.raises(LMKitError) as raised:
        _wait_for_marker(marker, os.getpid(), "load corpus")
    assert type(raised.value) is LMKitError
    assert str(raised.value) == f"load corpus failed on the main process ({marker}: error: ValueError: boom)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.done"]  # written whole, by rename


def test_every_recipe_reports_errors_through_main_entry():
    """The launcher mechanism lives in `main_entry`: every recipe's ``main`` must be wrapped by it, so the rows of
    the bad-input catalogue (run in-process by tests/test_bad_inputs.py) behave under the launcher as above."""
    wrapper_code = errors.main_entry(lambda: None).__code__
    for name in RECIPES:
        spec = importlib.util.spec_from_file_location(f"_launch_recipe_{name}", REPO / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main.__code__ is wrapper_code, name


def test_plain_exit_without_a_launcher(tmp_path):
    """Run directly (python recipes/X.py), the error line is printed at once and the exit status is 2."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), "--num_threads", "-2"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == errors.USER_ERROR_EXIT
    assert proc.stderr.strip().splitlines() == ["lmkit: error: --num_threads must be a positive integer, got -2"]


def test_a_finished_recipe_destroys_its_process_group(tmp_path):
    """A recipe that returns leaves no process group for interpreter teardown (where gloo can abort a rank that
    finished); one that fails leaves it to the launcher, since another rank may still be inside a collective."""
    import torch.distributed as dist

    def init(name):
        store = dist.FileStore(str(tmp_path / name), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    @errors.main_entry
    def finishes():
        tensor = torch.tensor([2.0])
        dist.all_reduce(tensor, async_op=True).wait()
        return tensor.item()

    @errors.main_entry
    def fails():
        raise LMKitError("--train_files x: no such file")

    init("ok")
    assert finishes() == 2.0
    assert not dist.is_initialized()
    init("bad")
    try:
        with pytest.raises(SystemExit):
            fails()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


# -- one output dir, one run -------------------------------------------------------------------------------------
def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = OutputDirLock(tmp_path / "out")
    first.acquire()
    holder = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid()
    with pytest.raises(
        LMKitError, match=rf"--output_dir {tmp_path / 'out'} is in use by another run \(pid {os.getpid()} "
    ):
        OutputDirLock(tmp_path / "out").acquire()
    assert (tmp_path / "out" / LOCK_NAME).exists()  # the refusal took nothing from the holder
    first.release()
    assert not (tmp_path / "out").exists()  # the lock made the dir and the run left nothing: both gone
    with OutputDirLock(tmp_path / "out"):  # free again
        pass


def test_a_holder_with_a_very_long_command_line_is_still_named(tmp_path, monkeypatch):
    """The holder record keeps at most 2,000 characters of the command: a launcher's 100 KB argument (the bad-input
    catalogue's driver passes its rows as one) made it unreadable, and the refusal said "holder unknown"."""
    monkeypatch.setattr(sys, "argv", ["driver.py", "x" * 100_000])
    first = OutputDirLock(tmp_path / "out")
    first.acquire()
    command = json.loads((tmp_path / "out" / LOCK_NAME).read_text())["command"]
    assert command == "driver.py " + "x" * 1990 + " ..."
    with pytest.raises(LMKitError, match=rf"is in use by another run \(pid {os.getpid()} on "):
        OutputDirLock(tmp_path / "out").acquire()
    first.release()


def test_lock_keeps_a_dir_it_did_not_create(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with OutputDirLock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from lmkit.lock import OutputDirLock; "
        "OutputDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out"), str(REPO)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(LMKitError, match=f"pid {holder.pid} "):
        OutputDirLock(tmp_path / "out").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
    with caplog.at_level("WARNING", logger="lmkit.lock"), OutputDirLock(tmp_path / "out"):
        assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"took over a stale lock (pid {holder.pid} " in caplog.text


@pytest.mark.long  # default suite <= 15 min on 2 cores: run with `pytest -m long` (see README)
def test_second_launch_on_a_running_output_dir_is_refused_and_the_first_goes_on(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "out"
    args = (*TINY_PRETRAIN, "--train_files", str(corpus), "--output_dir", str(out), "--save_steps", "1000")
    first = start("pretrain", *args, "--max_steps", "100000", "--torch_compile", "false", cwd=tmp_path)  # no compile
    deadline = time.monotonic() + 120
    while not (out / LOCK_NAME).exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.5)
    code, output = run("pretrain", *args, "--max_steps", "2", cwd=tmp_path, timeout=180)
    holder = json.loads((out / LOCK_NAME).read_text())
    _assert_one_line_last(code, output, f"--output_dir {out} is in use by another run (pid {holder['pid']} ")
    assert first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGINT)  # Ctrl-C at the launcher, which stops its child
    try:
        finish(first, timeout=300)
    except subprocess.TimeoutExpired:
        first.kill()
        finish(first, timeout=60)
    with OutputDirLock(out):  # however the first run ended, the dir is free again (released, or stale)
        pass


# -- all cores by default ----------------------------------------------------------------------------------------
@pytest.fixture
def restore_threads(monkeypatch):
    threads = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    torch.set_num_threads(threads)


def test_threads_default_to_the_usable_cores_shared_among_local_processes(restore_threads):
    cores = len(os.sched_getaffinity(0))
    assert runtime.configure_threads() == f"{cores} ({cores} cores / 1 process)"
    assert torch.get_num_threads() == cores
    restore_threads.setenv("LOCAL_WORLD_SIZE", str(cores + 1))  # more processes than cores: one thread each
    assert runtime.configure_threads() == f"1 ({cores} cores / {cores + 1} processes)"
    assert torch.get_num_threads() == 1


def test_threads_the_user_chose_win(restore_threads):
    restore_threads.setenv("OMP_NUM_THREADS", "1")  # exported by the user (no launcher above pytest)
    assert runtime.configure_threads() == "1 (OMP_NUM_THREADS)"
    assert runtime.configure_threads(3) == "3 (--num_threads)"
    assert torch.get_num_threads() == 3


def test_accelerate_default_of_one_thread_is_not_a_user_choice(tmp_path):
    """Through the real launcher: accelerate exports OMP_NUM_THREADS=1, lmkit takes the cores anyway; a user's
    --num_cpu_threads_per_process is respected."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import os; from lmkit import launcher; "
        "print('PROBE', os.environ['OMP_NUM_THREADS'], launcher.user_set_threads(), launcher.accelerate_launcher_pid() "
        "== os.getppid())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    lines = []
    for extra in ((), ("--num_cpu_threads_per_process", "2")):
        proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *extra, str(probe)], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        lines.append(next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")))
    assert lines == ["PROBE 1 None True", "PROBE 2 2 True"]
    assert launcher.accelerate_launcher_pid() is None  # pytest itself was not launched by accelerate
