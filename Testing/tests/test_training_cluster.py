"""Training on a cluster: one run per output folder, checkpoints that survive a cut write, preemption that loses
at most one step, ranks that must share storage, and the SLURM template run with stand-in srun/scontrol
around the real torchrun (gloo over loopback, small models)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from configfactory import TINY_ENCODER, write_config
from deeplesion_factory import write_deeplesion

from clear_training.config import load_config
from clear_training.data import prepare_deeplesion
from clear_training.distributed import DistInfo
from clear_training.pretrain import Trainer
from CLEARLib.errors import CLEARInputError, CLEARRunError

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "training" / "slurm" / "train.sbatch"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun is installed with torch")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    write_deeplesion(root / "DeepLesion", n_patients=6, slices=16, size=64)
    prepare_deeplesion(root / "DeepLesion", root / "store", size=48, test_fraction=0.25, seed=0)
    return root / "store"


def _config(folder: Path, store: Path, name: str, out_dir=None, **overrides) -> Path:
    cfg = {
        "run": {"name": name, "out_dir": str(out_dir or folder / name), "epochs": 200, "warmup_epochs": 1,
                "log_every_steps": 1, "device": "cpu"},
        "data": {"store": str(store), "image_size": 32},
        "model": {"encoder": "mambaout_femto", "encoder_kwargs": TINY_ENCODER, "dim": 8, "mlp_dim": 16,
                  "mlp_norm": "none"},
        "method": {"name": "lecl", "lam": 1.0},
        "optim": {"lr": 0.05, "batch_size": 8, "weight_decay": 0.0},
    }  # fmt: skip
    return write_config(folder, name, cfg, overrides)


def _checkpoint(folder: Path, name: str = "last.pt") -> dict:
    return torch.load(folder / name, weights_only=True)


# ------------------------------------------------------------------------------ one run per output folder
def test_a_sweep_job_with_another_config_is_refused_not_resumed(tmp_path, store):
    Trainer(load_config(_config(tmp_path, store, "lam1", out_dir=tmp_path / "shared", run__max_steps=2))).fit()
    with pytest.raises(CLEARInputError) as refused:
        Trainer(load_config(_config(tmp_path, store, "lam3", out_dir=tmp_path / "shared", method__lam=3.0)))
    message = str(refused.value)
    assert "method.lam: 1.0 in the checkpoint, 3.0 now" in message and "run.name: 'lam1'" in message
    assert "its own run.out_dir" in message and "run.max_steps" not in message
    # what may change on resume does not count: a longer run of the same config continues
    longer = Trainer(load_config(_config(tmp_path, store, "lam1", out_dir=tmp_path / "shared", run__max_steps=4)))
    assert longer.global_step == 2


def test_another_world_size_is_refused_unless_asked_for(tmp_path, store, capsys):
    config = _config(tmp_path, store, "ws", run__max_steps=2)
    Trainer(load_config(config)).fit()
    state = _checkpoint(tmp_path / "ws")
    state["world_size"] = 2  # as if two processes had written it
    torch.save(state, tmp_path / "ws" / "last.pt")
    with pytest.raises(CLEARInputError, match="written by 2 processes, this run has 1"):
        Trainer(load_config(config))
    allowed = _config(tmp_path, store, "ws", run__max_steps=3, run__resume_with_other_world_size=True)
    assert Trainer(load_config(allowed)).global_step == 2
    assert "not exactly as the original run would have" in capsys.readouterr().err


def test_a_cut_checkpoint_falls_back_to_the_one_before_and_each_step_is_logged_once(tmp_path, store, capsys):
    config = _config(tmp_path, store, "cut", run__max_steps=3, run__checkpoint_every_steps=1)
    Trainer(load_config(config)).fit()
    out = tmp_path / "cut"
    assert _checkpoint(out)["global_step"] == 3 and _checkpoint(out, "previous.pt")["global_step"] == 2
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 3])  # a write cut off by a node failure
    resumed = Trainer(load_config(_config(tmp_path, store, "cut", run__max_steps=5, run__checkpoint_every_steps=1)))
    err = capsys.readouterr().err
    assert "last.pt" in err and "is unreadable; resuming from" in err and "previous.pt" in err
    assert resumed.global_step == 2
    resumed.fit()
    steps = [json.loads(line)["global_step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # step 3 ran twice, and is logged once
    (out / "previous.pt").write_bytes(b"not a checkpoint")
    (out / "last.pt").write_bytes(b"")
    with pytest.raises(CLEARRunError, match="no readable checkpoint"):
        Trainer(load_config(config))


def test_batch_norm_over_cpu_processes_is_refused(tmp_path, store):
    config = load_config(_config(tmp_path, store, "bn", model__mlp_norm="batchnorm"))
    with pytest.raises(CLEARInputError, match="gloo has no SyncBatchNorm"):
        Trainer(config, dist=DistInfo(rank=0, world_size=2))


# ------------------------------------------------------------------------------ real processes
def _port_in(low: int, high: int) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if low <= port < high:
            return port
    for port in range(low, high):  # the system hands out ephemeral ports elsewhere: try the range itself
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _stand_ins(folder: Path) -> dict:
    """srun and scontrol as a one-node job would see them: srun drops its options and runs the command (so a
    signal to srun reaches torchrun, as srun forwards it); scontrol names the node and records a requeue."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "srun $*" >> "$CLEAR_SLURM_LOG"\n'
        'echo "SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK OMP_NUM_THREADS=$OMP_NUM_THREADS" >> "$CLEAR_SLURM_LOG"\n'
        'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\ncase "$1" in\n  show) echo 127.0.0.1 ;;\n'
        '  requeue) echo "requeue $2" >> "$CLEAR_SLURM_LOG" ;;\nesac\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _job(folder: Path, args: list[str], job_id: int, env_extra: dict | None = None) -> subprocess.Popen:
    bin_dir = folder / "bin" if (folder / "bin").exists() else _stand_ins(folder)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{BIN}:{os.environ['PATH']}",
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_NNODES": "1",
        "SLURM_GPUS_ON_NODE": "2",
        "SLURM_CPUS_PER_TASK": "2",
        "CLEAR_SLURM_LOG": str(folder / "slurm.log"),
        **(env_extra or {}),
    }
    return subprocess.Popen(["bash", str(TEMPLATE), *args], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def _logged_steps(out: Path) -> list[int]:
    log = out / "log.jsonl"
    return [json.loads(line)["global_step"] for line in log.read_text().splitlines()] if log.exists() else []


def test_slurm_template_preemption_loses_no_finished_step_and_resumes_exactly(tmp_path, store):
    """The template on a one-node, two-process job: the rendezvous port comes from the job ID, srun gets the
    CPUs, clear-train runs verbose; USR1 (the time-limit warning) stops both workers at a step boundary after
    rank 0 saved, the job requeues itself, and the requeued job continues exactly as an uninterrupted run."""
    port = _port_in(20000, 40000)
    job_id = 100000 + port - 20000  # the template's port: 20000 + job ID mod 20000
    config = _config(tmp_path, store, "preempted")
    job = _job(tmp_path, ["pretrain", "--config", str(config)], job_id)
    out = tmp_path / "preempted"
    deadline = time.monotonic() + 120
    while len(_logged_steps(out)) < 4 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, job.stdout.read()
    started_signal = time.monotonic()
    os.kill(job.pid, signal.SIGUSR1)  # to the batch shell, as --signal=B:USR1@300 does
    output, _ = job.communicate(timeout=120)
    stop_seconds = time.monotonic() - started_signal
    assert job.returncode != 0, output
    slurm_log = (tmp_path / "slurm.log").read_text()
    assert f"--rdzv-endpoint=127.0.0.1:{port}" in slurm_log and "--cpus-per-task=2" in slurm_log
    assert "SRUN_CPUS_PER_TASK=2 OMP_NUM_THREADS=1" in slurm_log and " -v pretrain --config" in slurm_log
    assert f"requeue {job_id}" in slurm_log
    assert "SIGTERM received: saved" in output
    saved = _checkpoint(out)
    assert saved["global_step"] == max(_logged_steps(out))  # every finished step is in the checkpoint
    assert saved["world_size"] == 2
    # The requeued job (same ID, SLURM_RESTART_COUNT 1) resumes and runs to 3 more steps.
    target = saved["global_step"] + 3
    resumed = _job(tmp_path, ["pretrain", "--config", str(config), "--set", f"run.max_steps={target}"], job_id,
                   {"SLURM_RESTART_COUNT": "1"})  # fmt: skip
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output
    assert f"resumed {out / 'last.pt'}" in output and "restart 1" in output
    assert _logged_steps(out) == list(range(1, target + 1))  # each step logged once
    # An uninterrupted run of the same config to the same step has the same weights.
    straight_config = _config(tmp_path, store, "straight", run__max_steps=target)
    straight = _job(tmp_path, ["pretrain", "--config", str(straight_config)], job_id + 1)
    output, _ = straight.communicate(timeout=180)
    assert straight.returncode == 0, output
    expected, actual = _checkpoint(tmp_path / "straight")["state_dict"], _checkpoint(out)["state_dict"]
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
    print(json.dumps({"stop_after_signal_s": round(stop_seconds, 2), "steps_lost": 0}))


def test_a_finished_two_process_run_leaves_no_gloo_thread_to_interpreter_shutdown(tmp_path, store):
    """clear-train pretrain on two ranks, then the exit handlers: the process group's threads must be gone before
    the interpreter is torn down. A gloo worker thread still alive then, freeing the run's last collective,
    aborted the rank ("terminate called without an active exception", SIGABRT) in about one run in twenty
    after the run had finished, and torchrun failed the job. It stayed alive when the group was left to
    interpreter shutdown, or when the trainer's DistributedDataParallel outlived fit(), as it does when a
    library's stored import error holds the frame the trainer lives in."""
    config = _config(tmp_path, store, "ended", run__max_steps=3)
    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, os\n"
        "from clear_training.cli import main\n"
        "threads = len(os.listdir('/proc/self/task'))\n"
        f"code = main(['-q', 'pretrain', '--config', {str(config)!r}])\n"
        "atexit._run_exitfuncs()\n"
        "print(f'exit {code}: threads {threads} before the run, {len(os.listdir(\"/proc/self/task\"))} after')\n"
    )
    port = _port_in(20000, 60000)
    run = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node=2", "--max-restarts=0", f"--master-port={port}",
                          str(script)], capture_output=True, text=True, timeout=180)  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "terminate called" not in output, output
    ends = re.findall(r"exit (\d+): threads (\d+) before the run, (\d+) after", run.stdout)
    assert len(ends) == 2 and all(code == "0" and int(after) <= int(before) for code, before, after in ends), output


def _can_bind_mount() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def test_ranks_on_node_local_folders_are_stopped_with_a_message(tmp_path, store):
    """Two torchrun agents (two "nodes") that each see their own folder at the run's out_dir, as node-local
    scratch would: every rank stops at start and says the output folder must be shared. Each agent gets a
    private mount of its own folder at out_dir (unshare, where allowed), else its own out_dir."""
    out_dir = tmp_path / "scratch" / "run"
    out_dir.mkdir(parents=True)
    config = _config(tmp_path, store, "local", out_dir=out_dir, run__max_steps=20)
    port = _port_in(20000, 60000)
    agents = []
    for node in (0, 1):
        local = tmp_path / f"node{node}-scratch"
        local.mkdir()
        train = [str(BIN / "torchrun"), "--nnodes=2", "--nproc-per-node=1", "--max-restarts=0",
                 "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=local",
                 str(BIN / "clear-train"), "pretrain", "--config", str(config)]  # fmt: skip
        if _can_bind_mount():
            script = f'mount --bind "{local}" "{out_dir}" && exec "$@"'
            command = ["unshare", "--mount", "bash", "-c", script, "node", *train]
        else:
            command = [*train, "--set", f"run.out_dir={local}"]
        agents.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [agent.communicate(timeout=180)[0] for agent in agents]
    assert all(agent.returncode != 0 for agent in agents), outputs
    assert all("do not share one output folder" in output for output in outputs), outputs
    assert "rank 1: cannot see rank 0's files" in outputs[0]
    assert not list(tmp_path.glob("node*-scratch/last.pt")) and not (out_dir / "last.pt").exists()  # nothing trained


def test_a_second_job_in_a_running_jobs_folder_is_refused(tmp_path, store, monkeypatch):
    config = _config(tmp_path, store, "locked", run__max_steps=2)
    monkeypatch.setenv("SLURM_JOB_ID", "111")
    first = Trainer(load_config(config))  # holds run.lock until its fit ends
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = json.loads((tmp_path / "locked" / "run.lock").read_text())
        assert lock["job"] == "111"
        # the lock as another live process of another job would hold it
        (tmp_path / "locked" / "run.lock").write_text(json.dumps({**lock, "job": "222", "pid": holder.pid}))
        with pytest.raises(CLEARRunError, match="another run uses .*job 222.*give this run its own run.out_dir"):
            Trainer(load_config(config))
        monkeypatch.setenv("SLURM_JOB_ID", "222")  # the same job, requeued, takes its folder back
        Trainer(load_config(config)).fit()
        assert not (tmp_path / "locked" / "run.lock").exists()  # released when the run ends
    finally:
        holder.kill()
        holder.wait()
    del first
    # a lock left by a process that is gone (kill -9) on this host does not block a new job
    (tmp_path / "locked" / "run.lock").write_text(json.dumps({**lock, "job": "333", "pid": holder.pid}))
    monkeypatch.setenv("SLURM_JOB_ID", "444")
    assert Trainer(load_config(_config(tmp_path, store, "locked", run__max_steps=3))).global_step == 2


def test_slurm_template_runs_extraction_sharded_without_file_collisions(tmp_path, tiny_case_bundle):
    """`train.sbatch extract ...` on one node with two workers: every case is extracted once, by one rank, into
    its own file, also for IDs that differ only in characters a file name cannot hold."""
    from clear_training.extract import feature_file, read_features
    from CLEARLib.io import write_volume
    from CLEARLib.phantom import make_phantom

    ids = ["LUNG1/001", "LUNG1_001", "case 1", "case_1"]
    rows = ["case_id,path"]
    for i, case in enumerate(ids):
        volume, _ = make_phantom((6 + i, 32, 32), (6.0, 6.0, 10.0), seed=i)
        rows.append(f'"{case}",{write_volume(volume, tmp_path / f"v{i}.nrrd")}')
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    port = _port_in(20000, 40000)
    args = [
        "extract",
        "--model",
        str(tiny_case_bundle),
        "--cohort",
        "cohort.csv",
        "--out",
        "features",
        "--device",
        "cpu",
    ]
    job = _job(tmp_path, args, 200000 + port - 20000)
    output, _ = job.communicate(timeout=180)
    assert job.returncode == 0, output
    reports = [json.loads((tmp_path / "features" / f"extract-report-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert sorted(reports[0]["done"] + reports[1]["done"]) == sorted(ids)
    assert not set(reports[0]["done"]) & set(reports[1]["done"])
    assert len(list((tmp_path / "features").glob("*.h5"))) == 4
    for i, case in enumerate(ids):
        assert read_features(feature_file(tmp_path / "features", case))["slice_index"][-1] == 5 + i
