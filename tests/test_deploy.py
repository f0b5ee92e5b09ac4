"""deploy/: a job submitted to a real local head, and the TPU launcher YAML checked by Ray.

The head is `ray start --head --block` bound to 127.0.0.1 on ports free right now, with its own
temp dir and a token of its own (RAY_AUTH_TOKEN, so ~/.ray/auth_token is neither read nor
written). It runs in its own process group and is stopped by its pid (then anything left in its group
is killed): `ray stop` would stop every Ray on the machine. Every Ray client here is a subprocess with an explicit
environment, so this process's Ray state (the token Ray caches) is untouched for other tests.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 240


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def head():
    """A local head; yields (job server address, client environment)."""
    temp_dir = tempfile.mkdtemp(prefix="kdr", dir="/tmp")  # short: Ray's unix sockets live here
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics, manager, objects = _free_ports(9)
    env = dict(os.environ)
    env.update(
        # The job's entrypoint runs with the head's PATH: the project's venv first (deploy/README).
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        # `ray job stop` waits this long after its SIGTERM before a SIGKILL (as cluster-tpu.yaml)
        RAY_JOB_STOP_WAIT_TIME_S="600",
    )
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp_dir, "head.log"), "wb")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(env_agent),
         "--metrics-export-port", str(metrics), "--node-manager-port", str(manager),
         "--object-manager-port", str(objects), "--num-cpus", "1", "--temp-dir", temp_dir,
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_server(address, env, proc, temp_dir)
        yield address, env
    finally:
        # `ray start --block` stops its node's processes itself when it gets SIGTERM (in ~2 s);
        # signalling the whole group at once instead leaves it waiting on them.
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Workers and agents the node started share the process group; none may outlive it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_server(address, env, proc, temp_dir):
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    probe = [str(VENV_BIN / "python"), "-c",
             f"from ray.job_submission import JobSubmissionClient; JobSubmissionClient({address!r})"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
            return
        time.sleep(2)
    log = Path(temp_dir, "head.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"the local head's job server did not come up at {address}:\n{log}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`--set` overrides of configs/tiny-test.yaml for a tokenizer, data and teacher made here
    (absolute paths: the job runs in its own copy of the working directory)."""
    from tiny_run import make_tiny_run

    work = tmp_path_factory.mktemp("job")
    return work, make_tiny_run(work) + [f"cache.path={work / 'cache'}", f"run_dir={work / 'run'}"]

POLL_CODE = textwrap.dedent("""
    import json, sys, time
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(sys.argv[1])
    deadline = time.monotonic() + float(sys.argv[3])
    while not (status := client.get_job_status(sys.argv[2])).is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
    print(json.dumps({"status": str(status.value), "logs": client.get_job_logs(sys.argv[2])}))
""")


def _submit(address: str, env: dict, overrides: list[str]) -> str:
    """`ray job submit --no-wait ... -- kdpipe run configs/tiny-test.yaml --set ...`; the job id."""
    job_id = f"kdpipe-test-{secrets.token_hex(4)}"
    sets = [arg for override in overrides for arg in ("--set", override)]
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
         "--no-wait", "--working-dir", ".", "--runtime-env", "deploy/runtime_env.yaml",
         "--", "kdpipe", "run", "configs/tiny-test.yaml", *sets],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    return job_id


def _poll(address: str, env: dict, job_id: str) -> dict:
    """The job's final status and logs (POLL_CODE in a client subprocess)."""
    poll = subprocess.run(
        [str(VENV_BIN / "python"), "-c", POLL_CODE, address, job_id, str(JOB_TIMEOUT_S)],
        env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60,
    )
    assert poll.returncode == 0, poll.stderr
    return json.loads(poll.stdout.strip().splitlines()[-1])


def test_job_submit_installs_the_project_and_runs_kdpipe_run(head, tiny_run):
    """`ray job submit ... -- kdpipe run configs/tiny-test.yaml`: the job installs the project
    through deploy/runtime_env.yaml, its driver joins the cluster (RAY_ADDRESS set by Ray), and
    a teacher host fills the cache while a student host trains."""
    address, env = head
    work, overrides = tiny_run
    job_id = _submit(address, env, overrides)
    outcome = _poll(address, env, job_id)
    assert outcome["status"] == "SUCCEEDED", outcome["logs"][-4000:]
    logs = outcome["logs"]
    summary, _ = json.JSONDecoder().raw_decode(logs[logs.rindex("\n{") + 1:])  # `kdpipe run` prints it last
    assert summary["step"] == 8 and summary["teacher_source"] == "offline"
    assert summary["teacher_hosts"] == 1 and summary["shards_written"] > 0
    assert (work / "run" / "student" / "model.safetensors").exists()


def test_ray_job_stop_has_the_students_checkpoint_first(head, tiny_run):
    """`ray job stop` on a long `kdpipe run` job (the cache the job above wrote is complete, so
    no teacher host starts): the driver's SIGTERM makes the student save a checkpoint at the
    step it stops at, and the job ends STOPPED."""
    from pipeline.checkpoint import read_checkpoint_metas
    from pipeline.metrics import read_metrics

    address, env = head
    work, overrides = tiny_run
    run_dir = work / "stopped"
    job_id = _submit(address, env, [*overrides, f"run_dir={run_dir}", "train.steps=100000",
                                    "checkpoint.every_steps=50000"])
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(r["step"] >= 20 for r in read_metrics(run_dir)):
        assert time.monotonic() < deadline, "the job logged no step 20"
        time.sleep(1)
    stop = subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", address, job_id],
                          env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    outcome = _poll(address, env, job_id)
    assert outcome["status"] == "STOPPED", outcome["logs"][-4000:]
    saved = max(read_checkpoint_metas(run_dir / "checkpoints"))
    assert saved >= 20  # where the student stopped: the periodic checkpoint is at 50000
    assert f"stopped by SIGTERM after saving the checkpoint of step {saved}" in outcome["logs"]


def test_submit_script_targets_loopback_with_token_auth():
    script = (REPO / "deploy" / "submit.sh").read_text()
    assert "RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}" in script
    assert "RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}" in script
    assert "--runtime-env deploy/runtime_env.yaml" in script
    help_run = subprocess.run(["bash", str(REPO / "deploy" / "submit.sh")], capture_output=True, text=True)
    assert help_run.returncode != 0 and "usage: deploy/submit.sh" in help_run.stderr


def test_submit_script_without_a_token_says_how_to_make_one(tmp_path):
    """No token anywhere Ray looks (a fresh HOME, no RAY_AUTH_TOKEN): one paragraph naming the
    command that makes one, exit 2, no traceback, nothing submitted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    (dashboard,) = _free_ports(1)  # nothing listens there: no other engineer's head is reached
    env.update(HOME=str(tmp_path), PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}",
               RAY_ADDRESS=f"http://127.0.0.1:{dashboard}")
    run = subprocess.run([str(REPO / "deploy" / "submit.sh"), "configs/demo.yaml"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith("deploy/submit.sh: error: ")
    assert "ray get-auth-token --generate" in run.stderr and "~/.ray/auth_token" in run.stderr
    assert not (tmp_path / ".ray").exists()  # the script makes no token itself


def test_tpu_launcher_yaml_passes_rays_validation():
    # Ray's GCP provider module (its get_node_type) needs the Google API client libraries; the
    # accelerator check it applies to TPU node configs is this one.
    import ray.util.tpu
    from ray._private.accelerators import TPUAcceleratorManager
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "deploy" / "cluster-tpu.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert "machineType" in types[prepared["head_node_type"]]["node_config"]  # a plain VM
    tpu_types = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    accelerators = sorted(t["node_config"]["acceleratorType"] for t in tpu_types.values())
    assert accelerators == ["v4-16", "v5litepod-16"]
    assert all(TPUAcceleratorManager.is_valid_tpu_accelerator_type(a) for a in accelerators)
    for accelerator in accelerators:  # a version Ray's TPU support knows ("v5e" is not one)
        ray.util.tpu.get_tpu_version_from_type(accelerator.rsplit("-", 1)[0])
    with pytest.raises(ValueError, match="v5e"):
        ray.util.tpu.get_tpu_version_from_type("v5e")
    # Teacher and student pods carry different custom resources, so the groups stay apart.
    assert {r for t in tpu_types.values() for r in t["resources"]} >= {"teacher", "student"}
    with pytest.raises(Exception, match="max_wrkers"):  # so does the schema
        validate_config({**prepared, "max_wrkers": 2})
    starts = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "0.0.0.0" not in starts
    assert "RAY_AUTH_MODE=token" in starts


def test_nothing_shipped_turns_auth_off_or_listens_on_all_interfaces():
    for path in [*(REPO / "deploy").iterdir()]:
        text = path.read_text()
        assert "RAY_AUTH_MODE=disabled" not in text, path
        assert "dashboard-host=0.0.0.0" not in text and "dashboard-host 0.0.0.0" not in text, path
