"""deploy/k8s and the Dockerfile: valid against the real Kubernetes schemas, and what
running Ango there needs (probes, secrets as files, non-root, draining in time).

The schemas are kubernetes-validate's, shipped in the package (no network).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from inspect import signature
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

import ango
from ango.cli import serve
from ango.shards.supervisor import ShardHandle
from server.http_api import HttpLimits
from server.limits import Limits
from tests.servers import TOKEN, ServeProcess, issued, new_batch

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "k8s"
#: The oldest Kubernetes the manifests are for (the preStop sleep action is beta,
#: on by default, from 1.30), and the newest whose schemas the package ships.
MIN_KUBERNETES = "1.30"
VERSIONS = (MIN_KUBERNETES, kubernetes_validate.utils.latest_version())
#: Set in the manifests for the cluster work of issue 13 (instance identity and
#: the address peers and clients reach it at), which `ango serve` reads once
#: that lands; every other ANGO_* name must be one Ango reads.


def kustomizations() -> list[Path]:
    return sorted(DEPLOY.rglob("kustomization.yaml"))


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def patch_files() -> set[Path]:
    """Files a kustomization uses as patches (partial resources, not manifests)."""
    return {(k.parent / p["path"]).resolve()
            for k in kustomizations() for p in load(k)[0].get("patches", [])}


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and p.resolve() not in patch_files())


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> resource, from every manifest."""
    found = {}
    for path in manifest_files():
        for doc in load(path):
            found[doc["kind"], doc["metadata"]["name"]] = doc
    return found


def strings(node: Any) -> Iterator[str]:
    """Every string anywhere in a resource, keys included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def validate(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message} "
                    f"(Kubernetes {version})")


STATEFULSET = resources()["StatefulSet", "ango"]
POD = STATEFULSET["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
ENV = {e["name"]: e for e in CONTAINER["env"]}
PORTS = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
MOUNTS = {m["mountPath"]: m for m in CONTAINER["volumeMounts"]}
VOLUMES = {v["name"]: v for v in POD["volumes"]}


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --- the schemas ----------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_is_valid_for_kubernetes(path, version):
    docs = load(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        validate(doc, version)


def test_the_preStop_sleep_action_needs_the_stated_minimum_version():
    # The check above is real: one version older refuses a field the manifests use.
    with pytest.raises(kubernetes_validate.ValidationError, match="sleep"):
        kubernetes_validate.validate(STATEFULSET, "1.28", strict=True)


def test_the_base_kustomization_lists_every_manifest_but_the_secret_template():
    base = load(DEPLOY / "base" / "kustomization.yaml")[0]
    listed = {DEPLOY / "base" / name for name in base["resources"]}
    assert listed == {p for p in manifest_files() if p.parent == DEPLOY / "base"}
    assert not any(path.name == "secret.template.yaml" for path in listed)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (for kustomize)")
@pytest.mark.parametrize("overlay", ["base", "tls"])
def test_each_kustomization_builds_into_valid_resources(overlay):
    built = subprocess.run(["kubectl", "kustomize", str(DEPLOY / overlay)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert built.returncode == 0, built.stderr
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    for doc in docs:
        validate(doc, MIN_KUBERNETES)
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    if overlay == "tls":
        # The certificate and key are files of the Secret ango-tls, mounted read-only.
        tls_dir = str(PurePosixPath(env["ANGO_TLS_CERT"]).parent)
        assert str(PurePosixPath(env["ANGO_TLS_KEY"]).parent) == tls_dir
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == tls_dir)
        volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == mount["name"])
        assert mount["readOnly"] and volume["secret"]["secretName"] == "ango-tls"
    else:
        assert "ANGO_TLS_CERT" not in env


# --- the StatefulSet ------------------------------------------------------------------

def test_readiness_and_liveness_are_the_http_probes():
    assert CONTAINER["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert CONTAINER["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert CONTAINER["startupProbe"]["httpGet"]["path"] == "/livez"
    # The probed port is the one the server's HTTP API listens on, on the pod's IP.
    args = CONTAINER["args"]
    assert int(option(args, "--http-port")) == PORTS["http"]
    assert option(args, "--http-host") == option(args, "--host") == "0.0.0.0"
    assert int(option(args, "--port")) == PORTS["ango"] == 7878
    # The startup probe waits at least as long as the server waits for PostgreSQL.
    startup = CONTAINER["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > float(
        option(args, "--db-wait"))


def test_every_argument_is_an_option_of_ango_serve():
    args = CONTAINER["args"]
    assert POD["containers"][0].get("command") is None  # the image's ENTRYPOINT: ango
    assert args[0] == "serve"
    known = {opt for param in serve.params for opt in param.opts}
    flags = [a for a in args[1:] if a.startswith("--")]
    assert set(flags) <= known, set(flags) - known


def test_credentials_are_files_from_the_secret_and_never_on_the_command_line():
    secret = resources()["Secret", "ango-credentials"]
    for variable, key in (("ANGO_TOKEN_FILE", "token"), ("ANGO_DSN_FILE", "dsn")):
        path = PurePosixPath(ENV[variable]["value"])
        mount = MOUNTS[str(path.parent)]
        volume = VOLUMES[mount["name"]]["secret"]
        assert mount["readOnly"] and volume["secretName"] == "ango-credentials"
        assert {"key": key, "path": path.name} in volume["items"] and key in secret["stringData"]
        # Ango refuses a secret file others can read; the pod's group (fsGroup) reads it.
        assert volume["defaultMode"] & 0o037 == 0 and volume["defaultMode"] & 0o040
    assert POD["securityContext"]["fsGroup"] == POD["securityContext"]["runAsGroup"]
    # Neither in the environment (every child process would inherit it) nor in argv.
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in CONTAINER["env"])
    assert not {"--token", "--dsn"} & set(CONTAINER["args"])


def test_no_token_or_password_is_written_in_any_manifest():
    secret = resources()["Secret", "ango-credentials"]
    assert set(secret["stringData"].values()) == {""}  # a template the operator fills
    password_in_url = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
    for (kind, name), doc in resources().items():
        for text in strings(doc):
            assert not password_in_url.search(text), f"a password in {kind}/{name}: {text}"
    config = resources()["ConfigMap", "ango-config"]["data"]
    assert not [k for k in config if re.search("TOKEN|DSN|PASSWORD|DATABASE_URL", k)]
    assert not [k for k in ENV if re.search("TOKEN|DSN|PASSWORD|DATABASE_URL", k)
                and not k.endswith("_FILE")]


def test_an_unfilled_secret_stops_the_server_with_a_clear_error(tmp_path):
    # The template applied as it is: empty files, as Kubernetes mounts them.
    token, dsn = tmp_path / "token", tmp_path / "dsn"
    for path, text in ((token, ""), (dsn, "")):
        path.write_text(text)
        path.chmod(0o440)
    env = {"PATH": "", "HOME": str(tmp_path), "ANGO_TOKEN_FILE": str(token),
           "ANGO_DSN_FILE": str(dsn)}
    command = [sys.executable, "-m", "ango", "serve", "--db-wait", "0", "--port", "0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"the token file {token} is empty" in done.stderr
    assert "Traceback" not in done.stderr
    token.chmod(0o600)
    token.write_text("a-token-the-operator-chose-0123456789\n")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"the DSN file {dsn} (ANGO_DSN_FILE) is empty" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare")
                         and shutil.which("setpriv")),
                    reason="needs root, unshare and setpriv to run the server as the pod does")
def test_the_server_runs_as_the_pods_user_on_a_read_only_root_without_a_home(dsn):
    """As in the pod: the image's user (no home), the root filesystem read-only (here in
    a private mount namespace), token and DSN as root-owned files of the pod's group."""
    uid, gid = POD["securityContext"]["runAsUser"], POD["securityContext"]["runAsGroup"]
    socket_dir = conninfo_to_dict(dsn).get("host", "")
    if socket_dir.startswith("/"):  # the embedded server's socket: only its own user gets in
        uid, gid = Path(socket_dir).stat().st_uid, Path(socket_dir).stat().st_gid
    assert uid != 0 and gid != 0
    secrets = Path(tempfile.mkdtemp(prefix="ango-pod-"))
    try:
        secrets.chmod(0o755)
        for name, text in (("token", TOKEN), ("dsn", dsn)):
            (secrets / name).write_text(text + "\n")
            os.chown(secrets / name, 0, gid)
            (secrets / name).chmod(VOLUMES["credentials"]["secret"]["defaultMode"])
        environment = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent",
                       "ANGO_TOKEN_FILE": str(secrets / "token"),
                       "ANGO_DSN_FILE": str(secrets / "dsn")}
        pod = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -o remount,bind,ro / && cd / && exec "$@"', "sh",
               "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
               "env", "-i", *(f"{k}={v}" for k, v in environment.items()),
               sys.executable, "-c", "from ango.cli import main; main()"]
        proc = ServeProcess("--host", "0.0.0.0", "--http-host", "0.0.0.0", "--shards", "1",
                            command=pod).start()
        try:
            status = (Path("/proc") / str(proc.proc.pid) / "status").read_text()
            assert re.search(rf"^Uid:\s+{uid}\s", status, re.M)
            with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/readyz") as ready:
                assert json.load(ready)["ready"] is True
            batch = new_batch(dsn, 3)
            with ango.Client(port=proc.port, token=TOKEN) as client:
                code = client.claim(batch, "customer-1", request_id="pod-1")
            assert [code] == [c for c, _, _ in issued(dsn)]
        finally:
            assert proc.stop() == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        shutil.rmtree(secrets)


def test_every_ango_setting_in_the_manifests_is_one_ango_reads():
    names = {k for k in ENV if k.startswith("ANGO_")}
    names |= {k for k in resources()["ConfigMap", "ango-config"]["data"] if k.startswith("ANGO_")}
    source = "\n".join(p.read_text() for folder in ("ango", "server")
                       for p in (ROOT / folder).rglob("*.py"))
    unread = {n for n in names if f'"{n}"' not in source}
    assert not unread


def test_the_instance_is_the_pod_and_advertises_its_stable_dns_name():
    assert ENV["ANGO_INSTANCE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    headless = resources()["Service", STATEFULSET["spec"]["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"]
    assert ENV["ANGO_ADVERTISE"]["value"] == (
        f"$(ANGO_INSTANCE_NAME).{STATEFULSET['spec']['serviceName']}"
        f".$(POD_NAMESPACE).svc.$(CLUSTER_DOMAIN):{PORTS['ango']}")
    # Each $(VAR) is defined before it is used, as Kubernetes expands them.
    order = list(ENV)
    for used in re.findall(r"\$\((\w+)\)", ENV["ANGO_ADVERTISE"]["value"]):
        assert order.index(used) < order.index("ANGO_ADVERTISE")
    # No Service links: the Service named ango would add ANGO_SERVICE_HOST, ANGO_PORT, ...
    assert POD["enableServiceLinks"] is False


def test_both_services_select_the_pods_and_carry_both_ports():
    labels = STATEFULSET["spec"]["template"]["metadata"]["labels"]
    services = {name: doc["spec"] for (kind, name), doc in resources().items()
                if kind == "Service"}
    assert services["ango"].get("type", "ClusterIP") == "ClusterIP"
    assert "clusterIP" not in services["ango"]
    for spec in services.values():
        assert spec["selector"].items() <= labels.items()
        assert {(p["port"], p["targetPort"]) for p in spec["ports"]} == {
            (PORTS[name], name) for name in PORTS}


def test_the_pod_runs_as_non_root_on_a_read_only_root_filesystem():
    pod, container = POD["securityContext"], CONTAINER["securityContext"]
    assert pod["runAsNonRoot"] and pod["runAsUser"] > 0 and pod["runAsGroup"] > 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    # The one writable place (spooled uploads): a bounded emptyDir.
    assert VOLUMES[MOUNTS["/tmp"]["name"]]["emptyDir"]["sizeLimit"]
    assert POD["automountServiceAccountToken"] is False


def test_the_grace_period_covers_the_preStop_sleep_and_the_whole_drain():
    sleep = CONTAINER["lifecycle"]["preStop"]["sleep"]["seconds"]
    answer_in_flight = max(Limits().shutdown_grace, HttpLimits().shutdown_grace)
    stop_shards = signature(ShardHandle.stop).parameters["timeout"].default
    assert sleep > 0
    assert POD["terminationGracePeriodSeconds"] > sleep + answer_in_flight + stop_shards


def test_a_disruption_budget_keeps_all_but_one_instance():
    pdb = resources()["PodDisruptionBudget", "ango"]["spec"]
    labels = STATEFULSET["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1 and STATEFULSET["spec"]["replicas"] > 1


def test_instances_spread_over_nodes_and_zones():
    labels = STATEFULSET["spec"]["template"]["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in POD["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread.values():
        assert constraint["maxSkew"] == 1
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


def test_resources_give_whole_cpus_so_the_quota_sets_the_shard_count():
    requests, limits = CONTAINER["resources"]["requests"], CONTAINER["resources"]["limits"]
    # ango/cpus.py rounds the quota down: a fractional limit would waste a part.
    assert re.fullmatch(r"[1-9][0-9]*", str(limits["cpu"]))
    # Requests equal to limits (the Guaranteed class): the shards get what they count on.
    assert requests["cpu"] == limits["cpu"] and requests["memory"] == limits["memory"]
    assert "--shards" not in CONTAINER["args"]


# --- the image ------------------------------------------------------------------------

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith("#")]
    stage: list[tuple[str, str]] = []
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stage = []
        stage.append((word.upper(), rest.strip()))
    return stage


def test_the_image_runs_ango_as_the_manifests_non_root_user():
    stage = final_stage()
    assert stage[0] == ("FROM", "python:3.11-slim")
    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1] == "{runAsUser}:{runAsGroup}".format(**POD["securityContext"])
    assert ("ENTRYPOINT", '["ango"]') in stage
    exposed = {int(p) for word, rest in stage if word == "EXPOSE" for p in rest.split()}
    assert exposed == set(PORTS.values())


def test_the_image_holds_no_secret_and_no_embedded_postgres():
    for word, rest in final_stage():
        if word in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"TOKEN|PASSWORD|DSN|DATABASE_URL|SECRET", rest, re.I), rest
    # It installs the wheel without extras: PostgreSQL is external.
    (install,) = [rest for word, rest in final_stage() if word == "RUN" and "pip install" in rest]
    assert "pip install /wheels/*.whl " in install and "embedded" not in install


def test_the_build_context_holds_what_the_wheel_is_built_from():
    kept = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")}
    assert {"setup.cfg", "pyproject.toml", "README.md", "LICENSE", "ango", "server"} <= kept
    assert "**" in (ROOT / ".dockerignore").read_text().splitlines()  # nothing else

