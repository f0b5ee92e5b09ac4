"""deploy/: the job path of deploy/README.md run as written, and the TPU launcher YAML checked by Ray.

The "On one machine" block of deploy/README.md is read from that file and run by bash in a fresh
HOME with no token given (no RAY_* variable is passed on), so the token the head and the clients
use is the one the README's own commands make. The few changes the test makes to the block are
listed in ``_as_run_here``; each must match the block exactly once, so a README that drifts
fails here instead of being tested by halves. The head listens on 127.0.0.1 on ports free right
now, with its own temp dir; the block runs in a session of its own, and the head is stopped by
signalling that session's processes (`ray stop`, the block's last line, would stop every Ray on
the machine). Every Ray client here is a subprocess with an explicit environment, so this
process's Ray state (the token Ray caches) is untouched for other tests.
"""

import json
import os
import re
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
TINY = REPO / "configs" / "tiny-test.yaml"
README_TIMEOUT_S = 1200  # the tiny demo, the head's start and the job, on a busy 2-core machine
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


def readme_block(heading: str) -> str:
    """The first ```bash block under ``## heading`` in deploy/README.md, continuation lines joined."""
    text = (REPO / "deploy" / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")


def _as_run_here(block: str, *, work: Path, config: Path, demo_outputs: Path,
                 ray_start_options: str, address: str) -> str:
    """The README block as this test runs it: the tiny config instead of configs/demo.yaml (for
    the job), ``work/demo`` instead of ``$PWD/runs/demo``, the head's own ports and temp dir,
    RAY_ADDRESS pointing submit.sh at them, and no final `ray stop`. Its `kdpipe demo` becomes a
    copy of ``demo_outputs``: what the session's `kdpipe demo --config <tiny>` (conftest.py's
    ``demo_dir``, checked by test_cli.py) wrote, the same command run once for the session."""
    lines = block.strip().splitlines()
    assert lines[-1].split("#")[0].strip() == "ray stop", block
    script = "\n".join(lines[:-1])
    if not (REPO / ".venv" / "bin" / "activate").exists():  # the project's venv lives elsewhere
        script = script.replace("source .venv/bin/activate", f"export PATH={VENV_BIN}:$PATH", 1)
    for old, new in [("configs/demo.yaml", str(config)),
                     ("kdpipe demo ", f"cp -r {demo_outputs} {work / 'demo'}  # "),
                     ("$PWD/runs/demo", str(work / "demo")),
                     ("ray start --head ", f"ray start --head {ray_start_options} "),
                     ("deploy/submit.sh ", f"RAY_ADDRESS={address} deploy/submit.sh ")]:
        assert script.count(old) == 1, f"deploy/README.md: expected {old!r} once in\n{block}"
        script = script.replace(old, new)
    return script


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except ProcessLookupError:
            pass
    return pids


def _stop_session(sid: int) -> None:
    """Stop the processes of session ``sid`` (the README block's, so its head): SIGTERM, then
    SIGKILL whatever is left after 5 s, as `ray stop` does after its grace period (16 s there;
    shorter here: the GCS server and the raylet can sit out a SIGTERM their peers got too)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, demo_dir):
    """deploy/README.md "On one machine", run (see ``_as_run_here``) up to its `ray stop`.
    Yields a dict: the job server's ``address``, the client ``env`` (the fresh HOME, token mode),
    ``work``, the tiny ``config``, the block's ``output`` and ``returncode``; stops the head after."""
    work = tmp_path_factory.mktemp("readme")
    (work / "home").mkdir()
    config = work / "demo.yaml"
    config.write_text(TINY.read_text().replace("runs/tiny-test", str(work / "demo")))
    temp_dir = tempfile.mkdtemp(prefix="kdr", dir="/tmp")  # short: Ray's unix sockets live here
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics, manager, objects = _free_ports(9)
    options = (f"--port {gcs} --dashboard-port {dashboard} --ray-client-server-port {client} "
               f"--dashboard-agent-listen-port {agent} --dashboard-agent-grpc-port {agent_grpc} "
               f"--runtime-env-agent-port {env_agent} --metrics-export-port {metrics} "
               f"--node-manager-port {manager} --object-manager-port {objects} "
               f"--temp-dir {temp_dir} --num-cpus 1 --disable-usage-stats")
    address = f"http://127.0.0.1:{dashboard}"
    script = _as_run_here(readme_block("On one machine"), work=work, config=config,
                          demo_outputs=demo_dir / "runs" / "tiny-test",
                          ray_start_options=options, address=address)
    # no PYTHONPATH either (conftest.py's, for the processes other tests start): the job
    # imports the project it uploaded
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN]
    env.update(HOME=str(work / "home"), PATH=os.pathsep.join(path))
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        try:
            output, _ = proc.communicate(timeout=README_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        clients = dict(env, RAY_AUTH_MODE="token", PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}")
        yield dict(address=address, env=clients, work=work, config=config, output=output,
                   returncode=proc.returncode)
    finally:
        _stop_session(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)

POLL_CODE = textwrap.dedent("""
    import json, sys, time
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(sys.argv[1])
    deadline = time.monotonic() + float(sys.argv[3])
    while not (status := client.get_job_status(sys.argv[2])).is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
    print(json.dumps({"status": str(status.value), "logs": client.get_job_logs(sys.argv[2])}))
""")


def _submit(address: str, env: dict, config: Path, overrides: list[str]) -> str:
    """`ray job submit --no-wait ... -- kdpipe run CONFIG --set ...`; the job id."""
    job_id = f"kdpipe-test-{os.urandom(4).hex()}"
    sets = [arg for override in overrides for arg in ("--set", override)]
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
         "--no-wait", "--working-dir", ".", "--runtime-env", "deploy/runtime_env.yaml",
         "--", "kdpipe", "run", str(config), *sets],
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


def test_readme_one_machine_block_runs_a_job_to_succeeded(readme_run):
    """The README's commands, as written (`kdpipe demo`'s data and teacher copied from the
    session's run of the same command, see ``_as_run_here``): the token is made before the head
    starts (so the head has token auth on), and submit.sh's job
    installs the project (deploy/runtime_env.yaml), joins the cluster (RAY_ADDRESS set by Ray),
    has a teacher host fill its cache from the demo's teacher while a student host trains, and
    ends SUCCEEDED."""
    output, work = readme_run["output"], readme_run["work"]
    assert readme_run["returncode"] == 0, output[-6000:]
    assert "Token authentication is disabled" not in output, output[-6000:]
    assert oct((work / "home" / ".ray" / "auth_token").stat().st_mode & 0o777) == "0o600"
    job_id = re.search(r"Job '(\S+)' submitted successfully", output).group(1)
    outcome = _poll(readme_run["address"], readme_run["env"], job_id)
    assert outcome["status"] == "SUCCEEDED", outcome["logs"][-4000:]
    logs = outcome["logs"]
    summary, _ = json.JSONDecoder().raw_decode(logs[logs.rindex("\n{") + 1:])  # `kdpipe run` prints it last
    assert summary["step"] == 8 and summary["teacher_source"] == "offline"
    assert summary["teacher_hosts"] == 1 and summary["shards_written"] > 0
    assert (work / "demo" / "job" / "student" / "model.safetensors").exists()
    # The head refuses a client that sends no token (Ray's default client mode).
    open_client = dict(readme_run["env"], HOME=str(work), RAY_AUTH_MODE="disabled")
    listing = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", readme_run["address"]],
                             env=open_client, capture_output=True, text=True, timeout=120)
    assert listing.returncode != 0, listing.stdout
    assert "Token authentication is enabled" in listing.stdout + listing.stderr


def test_ray_job_stop_has_the_students_checkpoint_first(readme_run):
    """`ray job stop` on a long `kdpipe run` job on the README's head (started with
    RAY_JOB_STOP_WAIT_TIME_S=600; the demo's cache is complete, so no teacher host starts): the
    driver's SIGTERM makes the student save a checkpoint at the step it stops at, and the job
    ends STOPPED."""
    from pipeline.checkpoint import read_checkpoint_metas
    from pipeline.metrics import read_metrics

    address, env, work = readme_run["address"], readme_run["env"], readme_run["work"]
    assert readme_run["returncode"] == 0, readme_run["output"][-6000:]
    run_dir = work / "stopped"
    job_id = _submit(address, env, readme_run["config"],
                     [f"model.teacher={{path: {work / 'demo' / 'teacher' / 'student'}}}",
                      f"run_dir={run_dir}", "train.steps=100000", "checkpoint.every_steps=50000"])
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
    # accelerator check it applies to TPU node configs is this one. Ray 2.60 has no public API
    # that validates a cluster launcher YAML (`ray up` does it only while launching), so this
    # test calls the private helpers `ray up` itself runs.
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
