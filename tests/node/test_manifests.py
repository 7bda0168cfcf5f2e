"""The k3s manifests (Forgejo, Traefik storage and routes) and the Traefik HelmChartConfig.

Templates are plain YAML with ${VAR} placeholders. They are rendered here in Python by the
same rules as the bootstrap's bash renderer (a test checks both give identical bytes), parsed
with yaml.safe_load_all, and checked on the parsed objects for both variants: with a domain
(HTTPS, Let's Encrypt) and without (plain HTTP on the Elastic IP)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

USERDATA = Path(__file__).resolve().parents[2] / "userdata"
MANIFESTS = USERDATA / "manifests"
SAFE_VALUE = re.compile(r"^[A-Za-z0-9._:/@+-]*$")
MOUNT = "/srv/spotforge"
IMAGE = "codeberg.org/forgejo/forgejo:15.0.9"

CONTEXTS: dict[str, dict[str, str]] = {
    "domain": {
        "SPOTFORGE_MOUNT": MOUNT,
        "SPOTFORGE_FORGEJO_IMAGE": IMAGE,
        "SPOTFORGE_DOMAIN": "git.example.com",
        "SPOTFORGE_ACME_EMAIL": "ops@example.com",
        "SPOTFORGE_PUBLIC_HOST": "git.example.com",
        "SPOTFORGE_ROOT_URL": "https://git.example.com/",
        "SPOTFORGE_BACKUP_INTERVAL_MINUTES": "5",
    },
    "ip": {
        "SPOTFORGE_MOUNT": MOUNT,
        "SPOTFORGE_FORGEJO_IMAGE": IMAGE,
        "SPOTFORGE_DOMAIN": "",
        "SPOTFORGE_ACME_EMAIL": "",
        "SPOTFORGE_PUBLIC_HOST": "203.0.113.10",
        "SPOTFORGE_ROOT_URL": "http://203.0.113.10/",
        "SPOTFORGE_BACKUP_INTERVAL_MINUTES": "5",
    },
}
VARIANTS = sorted(CONTEXTS)


class RenderError(ValueError):
    """A template or a value the renderer refuses."""


def template_vars() -> list[str]:
    """The placeholder list, read from the bash library so both renderers share one source."""
    text = (USERDATA / "lib/common.sh").read_text()
    block = re.search(r"SPOTFORGE_TEMPLATE_VARS=\((.*?)\)", text, re.S)
    assert block, "SPOTFORGE_TEMPLATE_VARS not found in common.sh"
    return block.group(1).split()


def render(text: str, values: dict[str, str]) -> str:
    for name in template_vars():
        value = values.get(name, "")
        if not SAFE_VALUE.match(value):
            raise RenderError(f"unsafe value for {name}")
        text = text.replace("${" + name + "}", value)
    if "${" in text:
        raise RenderError("unrendered placeholder")
    return text


def selected(variant: str) -> list[tuple[Path, str]]:
    """NAME.domain.yaml only with a domain, NAME.ip.yaml only without, the rest always."""
    out = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        name = path.name
        tags = [t for t in ("domain", "ip") if name.endswith(f".{t}.yaml")]
        if tags:
            if tags[0] != variant:
                continue
            name = name[: -len(f".{tags[0]}.yaml")] + ".yaml"
        out.append((path, name))
    return out


def rendered_docs(variant: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, _ in selected(variant):
        text = render(path.read_text(), CONTEXTS[variant])
        docs.extend(d for d in yaml.safe_load_all(text) if d is not None)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def traefik_values(variant: str) -> dict[str, Any]:
    text = render((MANIFESTS / f"k3s/traefik-config.{variant}.yaml").read_text(), CONTEXTS[variant])
    (config,) = list(yaml.safe_load_all(text))
    assert config["apiVersion"] == "helm.cattle.io/v1"
    assert config["kind"] == "HelmChartConfig"
    assert config["metadata"] == {"name": "traefik", "namespace": "kube-system"}
    values = yaml.safe_load(config["spec"]["valuesContent"])
    assert isinstance(values, dict)
    return values


def forgejo_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = find(docs, "Deployment", "forgejo")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


# --- rendering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_bash_and_python_renderers_produce_identical_manifests(variant: str, tmp_path: Path) -> None:
    ctx = CONTEXTS[variant]
    exports = "".join(f"export {k}='{v}'\n" for k, v in ctx.items())
    script = (
        "set -euo pipefail\n"
        f"source {USERDATA}/lib/common.sh\n"
        f"{exports}"
        f"render_dir {MANIFESTS} {tmp_path}/out {variant}\n"
        f"render_template {MANIFESTS}/k3s/traefik-config.{variant}.yaml > {tmp_path}/traefik.yaml\n"
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    expected = {name: render(path.read_text(), ctx) for path, name in selected(variant)}
    actual = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    assert actual == expected
    traefik = render((MANIFESTS / f"k3s/traefik-config.{variant}.yaml").read_text(), ctx)
    assert (tmp_path / "traefik.yaml").read_text() == traefik


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_template_renders_with_no_placeholder_left(variant: str) -> None:
    for path, _ in selected(variant):
        assert "${" not in render(path.read_text(), CONTEXTS[variant])
    config = (MANIFESTS / f"k3s/traefik-config.{variant}.yaml").read_text()
    assert "${" not in render(config, CONTEXTS[variant])


def test_every_placeholder_used_in_a_template_is_a_known_variable() -> None:
    known = set(template_vars())
    for path in [*MANIFESTS.rglob("*.yaml"), *(USERDATA / "systemd").iterdir()]:
        used = set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", path.read_text()))
        assert used <= known, (path, used - known)


def test_python_renderer_refuses_what_the_bash_renderer_refuses() -> None:
    with pytest.raises(RenderError, match="unsafe"):
        render('a: "${SPOTFORGE_DOMAIN}"', {"SPOTFORGE_DOMAIN": 'x"\nkind: Secret'})
    with pytest.raises(RenderError, match="unrendered"):
        render("a: ${SPOTFORGE_UNKNOWN}", {})


def test_variants_select_exactly_one_ingress_each() -> None:
    assert [n for _, n in selected("domain")] == [n for _, n in selected("ip")]
    assert "30-forgejo-ingress.domain.yaml" in [p.name for p, _ in selected("domain")]
    assert "30-forgejo-ingress.ip.yaml" in [p.name for p, _ in selected("ip")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_well_formed_and_namespaced_where_it_must_be(variant: str) -> None:
    docs = rendered_docs(variant)
    assert docs
    cluster_scoped = {"Namespace", "PersistentVolume"}
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") in ("forgejo", "kube-system"), doc["metadata"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_tcp_route_uses_a_non_standard_api(variant: str) -> None:
    apis = {d["apiVersion"] for d in rendered_docs(variant)}
    assert apis - {"v1", "apps/v1", "networking.k8s.io/v1"} == {"traefik.io/v1alpha1"}


def test_namespace_comes_first_so_a_single_apply_succeeds() -> None:
    (first_path, _) = selected("domain")[0]
    first = next(yaml.safe_load_all(render(first_path.read_text(), CONTEXTS["domain"])))
    assert first == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "forgejo"}}


# --- Forgejo ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_forgejo_is_one_pod_replaced_by_recreate(variant: str) -> None:
    deployment = find(rendered_docs(variant), "Deployment", "forgejo")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forgejo_image_is_the_pinned_one_from_settings(variant: str) -> None:
    image = forgejo_container(rendered_docs(variant))["image"]
    assert image == IMAGE
    assert ":" in image.rsplit("/", 1)[1] and not image.endswith(":latest")
    assert "-rootless" not in image


@pytest.mark.parametrize("variant", VARIANTS)
def test_forgejo_data_is_the_volume_directory_and_never_created_on_the_root_disk(variant: str) -> None:
    docs = rendered_docs(variant)
    pod = find(docs, "Deployment", "forgejo")["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["hostPath"] == {"path": f"{MOUNT}/forgejo", "type": "Directory"}
    (mount,) = forgejo_container(docs)["volumeMounts"]
    assert mount == {"name": volume["name"], "mountPath": "/data"}


def test_forgejo_settings_with_a_domain() -> None:
    env = env_of(forgejo_container(rendered_docs("domain")))
    assert env["FORGEJO__database__DB_TYPE"] == "sqlite3"
    assert env["FORGEJO__database__PATH"] == "/data/gitea/gitea.db"
    assert env["FORGEJO__server__DOMAIN"] == "git.example.com"
    assert env["FORGEJO__server__SSH_DOMAIN"] == "git.example.com"
    assert env["FORGEJO__server__ROOT_URL"] == "https://git.example.com/"
    assert env["FORGEJO__server__SSH_PORT"] == "22"
    assert env["FORGEJO__security__INSTALL_LOCK"] == "true"
    assert env["FORGEJO__service__DISABLE_REGISTRATION"] == "true"


def test_forgejo_settings_without_a_domain_use_the_elastic_ip_over_http() -> None:
    env = env_of(forgejo_container(rendered_docs("ip")))
    assert env["FORGEJO__server__DOMAIN"] == "203.0.113.10"
    assert env["FORGEJO__server__SSH_DOMAIN"] == "203.0.113.10"
    assert env["FORGEJO__server__ROOT_URL"] == "http://203.0.113.10/"
    assert env["FORGEJO__security__INSTALL_LOCK"] == "true"


@pytest.mark.parametrize("variant", VARIANTS)
def test_env_values_are_strings_as_kubernetes_requires(variant: str) -> None:
    for item in forgejo_container(rendered_docs(variant))["env"]:
        assert isinstance(item["value"], str), item


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_links_are_off_so_no_forgejo_prefixed_variables_leak_into_app_ini(variant: str) -> None:
    pod = find(rendered_docs(variant), "Deployment", "forgejo")["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_check_healthz_on_port_3000_with_a_patient_liveness(variant: str) -> None:
    container = forgejo_container(rendered_docs(variant))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe_name in ("readinessProbe", "livenessProbe"):
        probe = container[probe_name]["httpGet"]
        assert probe["path"] == "/api/healthz"
        assert ports.get(probe["port"], probe["port"]) == 3000
    liveness = container["livenessProbe"]
    assert liveness["initialDelaySeconds"] >= 300, "migrations can take minutes"
    assert container["readinessProbe"]["periodSeconds"] <= 5, "readiness bounds handoff downtime"


def to_mib(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_resources_fit_a_two_gib_t4g_small_beside_k3s(variant: str) -> None:
    resources = forgejo_container(rendered_docs(variant))["resources"]
    assert to_mib(resources["requests"]["memory"]) <= 512
    assert to_mib(resources["limits"]["memory"]) <= 1024
    assert resources["requests"]["cpu"].endswith("m")


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_exposes_http_and_ssh_inside_the_cluster(variant: str) -> None:
    docs = rendered_docs(variant)
    service = find(docs, "Service", "forgejo")
    assert service["spec"]["type"] == "ClusterIP"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 3000, "ssh": 22}
    pod_labels = find(docs, "Deployment", "forgejo")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# --- routes -------------------------------------------------------------------------------------


def test_with_a_domain_the_ingress_is_https_only_with_the_letsencrypt_resolver() -> None:
    ingress = find(rendered_docs("domain"), "Ingress", "forgejo")
    notes = ingress["metadata"]["annotations"]
    assert notes["traefik.ingress.kubernetes.io/router.entrypoints"] == "websecure"
    assert notes["traefik.ingress.kubernetes.io/router.tls"] == "true"
    assert notes["traefik.ingress.kubernetes.io/router.tls.certresolver"] == "letsencrypt"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "git.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "forgejo", "port": {"name": "http"}}


def test_without_a_domain_the_ingress_is_plain_http_for_any_host() -> None:
    ingress = find(rendered_docs("ip"), "Ingress", "forgejo")
    notes = ingress["metadata"]["annotations"]
    assert notes["traefik.ingress.kubernetes.io/router.entrypoints"] == "web"
    assert not any("tls" in key for key in notes)
    (rule,) = ingress["spec"]["rules"]
    assert "host" not in rule
    assert "tls" not in ingress["spec"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_git_ssh_goes_from_the_ssh_entry_point_to_forgejo_port_22(variant: str) -> None:
    docs = rendered_docs(variant)
    route = find(docs, "IngressRouteTCP", "forgejo-ssh")
    assert route["metadata"]["namespace"] == "forgejo"
    assert route["spec"]["entryPoints"] == ["ssh"]
    (rule,) = route["spec"]["routes"]
    assert rule["match"] == "HostSNI(`*`)"
    assert rule["services"] == [{"name": "forgejo", "port": 22}]


# --- Traefik ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_traefik_data_is_a_static_volume_on_the_data_disk(variant: str) -> None:
    docs = rendered_docs(variant)
    values = traefik_values(variant)
    persistence = values["persistence"]
    assert persistence["enabled"] is True and persistence["path"] == "/data"
    claim = find(docs, "PersistentVolumeClaim", persistence["existingClaim"])
    assert claim["metadata"]["namespace"] == "kube-system"
    volume = find(docs, "PersistentVolume", claim["spec"]["volumeName"])
    assert volume["spec"]["hostPath"] == {"path": f"{MOUNT}/traefik", "type": "Directory"}
    assert volume["spec"]["claimRef"] == {"namespace": "kube-system", "name": claim["metadata"]["name"]}
    assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    # An empty class keeps any default provisioner from binding the claim elsewhere.
    assert volume["spec"]["storageClassName"] == claim["spec"]["storageClassName"] == ""


def test_letsencrypt_resolver_stores_acme_json_on_the_data_volume() -> None:
    values = traefik_values("domain")
    acme = values["certificatesResolvers"]["letsencrypt"]["acme"]
    assert acme["email"] == "ops@example.com"
    assert acme["httpChallenge"] == {"entryPoint": "web"}
    assert acme["storage"] == "/data/acme.json"
    assert acme["storage"].startswith(values["persistence"]["path"] + "/")


def test_acme_json_is_prepared_private_and_owned_by_traefiks_user() -> None:
    # hostPath ignores fsGroup, so the bootstrap must own and chmod the store itself; the
    # behaviour is exercised in test_bootstrap, this pins the contract between the two files.
    steps = (USERDATA / "lib/steps.sh").read_text()
    assert "TRAEFIK_UID=65532" in steps
    assert 'chmod 0600 "$m/traefik/acme.json"' in steps


def test_without_a_domain_there_is_no_resolver_and_no_redirect() -> None:
    values = traefik_values("ip")
    assert "certificatesResolvers" not in values
    assert not any("redirections" in arg for arg in values.get("additionalArguments", []))


def test_with_a_domain_http_redirects_permanently_to_https_on_443() -> None:
    args = traefik_values("domain")["additionalArguments"]
    assert "--entryPoints.web.http.redirections.entryPoint.to=:443" in args
    assert "--entryPoints.web.http.redirections.entryPoint.scheme=https" in args
    assert "--entryPoints.web.http.redirections.entryPoint.permanent=true" in args


@pytest.mark.parametrize("variant", VARIANTS)
def test_ssh_entry_point_is_exposed_on_host_port_22(variant: str) -> None:
    ssh = traefik_values(variant)["ports"]["ssh"]
    assert ssh["exposedPort"] == 22
    assert ssh["expose"] == {"default": True}
    assert ssh["protocol"] == "TCP"
    # Inside the pod Traefik runs unprivileged, so it listens on a high port.
    assert ssh["port"] > 1024


@pytest.mark.parametrize("variant", VARIANTS)
def test_traefik_never_runs_two_pods_at_once(variant: str) -> None:
    values = traefik_values(variant)
    assert values["deployment"]["replicas"] == 1
    strategy = values["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
