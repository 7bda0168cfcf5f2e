"""The node bootstrap, its helper library, the agent wrapper and the systemd units.

Nothing here touches the host: every path the scripts write is prefixed with SPOTFORGE_ROOT (a
temporary directory) and every command they run that would change the machine or reach the
network (sshd, systemctl, dnf, curl, k3s, aws, the agent's Python) is a fake on PATH that records
its call and keeps a little state in a folder, so steps can be run twice and checked."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

USERDATA = Path(__file__).resolve().parents[2] / "userdata"
SHELL_FILES = [
    USERDATA / "bootstrap.sh",
    USERDATA / "bin" / "spotforge-agent",
    *sorted((USERDATA / "lib").glob("*.sh")),
]
UNITS = USERDATA / "systemd"
MOUNT = "/srv/spotforge"
IMAGE = "codeberg.org/forgejo/forgejo:15.0.9"
TRAEFIK_IMAGE = "rancher/mirrored-library-traefik:3.3.6"
K3S_VERSION = "v1.33.4+k3s1"
PARAM = "/spotforge/admin-password"

# One multi-call fake: its file name says which command it plays.
FAKE = r"""
import json, os, sys, glob
from pathlib import Path

name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
state = Path(os.environ["FAKE_STATE"])
root = os.environ.get("SPOTFORGE_ROOT", "")
with open(state / "calls.jsonl", "a") as log:
    log.write(json.dumps({"cmd": name, "args": args}) + "\n")

def flag(f):
    return (state / f).exists()

def touch(f, text=""):
    (state / f).write_text(text)

def opt(option):
    return args[args.index(option) + 1] if option in args else None

def users():
    p = state / "users.json"
    return json.loads(p.read_text()) if p.exists() else {}

if name == "sshd":
    main = Path(opt("-f"))
    ports = []
    def scan(path):
        for line in Path(path).read_text().splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "Include":
                for inc in sorted(glob.glob(root + words[1])):
                    scan(inc)
            elif len(words) == 2 and words[0] == "Port":
                ports.append(words[1])
    scan(main)
    for p in ports or ["22"]:
        print("port", p)
elif name == "systemctl":
    if args[:2] == ["restart", "sshd"]:
        touch("sshd_on_2222")
elif name == "ss":
    if flag("sshd_on_2222"):
        print("LISTEN 0 128 0.0.0.0:2222 0.0.0.0:*")
elif name == "rpm":
    sys.exit(0 if flag("packages") else 1)
elif name == "dnf":
    touch("packages")
elif name == "mountpoint":
    sys.exit(0 if flag("mounted") else 1)
elif name == "getenforce":
    print("Permissive")
elif name == "curl":
    url = [a for a in args if a.startswith("http")][0]
    if "-o" in args:
        Path(opt("-o")).write_text('#!/bin/sh\nexec k3s-install "$@"\n')
    elif url.endswith("/api/token"):
        print("TOKEN")
    elif url.endswith("/placement/region"):
        print("us-east-1")
    else:
        sys.exit(22)
elif name == "k3s-install":
    # What the real installer would see when it starts k3s.
    manifests = Path(root + "/var/lib/rancher/k3s/server/manifests")
    seen = {
        "env": {k: v for k, v in os.environ.items() if k.startswith("INSTALL_K3S_")},
        "traefik_config": (manifests / "spotforge-traefik-config.yaml").exists(),
        "k3s_config": Path(root + "/etc/rancher/k3s/config.yaml").exists(),
        "sshd_moved": flag("sshd_on_2222"),
    }
    touch("k3s_install.json", json.dumps(seen))
    touch("k3s_version", os.environ["INSTALL_K3S_VERSION"])
elif name == "k3s":
    if args == ["--version"]:
        if not flag("k3s_version"):
            sys.exit(1)
        print("k3s version %s (0123abcd)" % (state / "k3s_version").read_text())
    elif args[0] == "crictl":
        pulled = (state / "images").read_text().split() if flag("images") else []
        if args[1] == "inspecti":
            sys.exit(0 if args[2] in pulled else 1)
        if args[1] == "pull":
            touch("images", " ".join(pulled + [args[2]]))
    elif args[0] == "kubectl" and "get" in args and "traefik" in args:
        print(os.environ["FAKE_TRAEFIK_IMAGE"], end="")
    elif args[0] == "kubectl" and "exec" in args:
        if os.environ.get("FAKE_FORGEJO_DOWN"):
            print("error: unable to upgrade connection", file=sys.stderr)
            sys.exit(1)
        cli = args[args.index("forgejo", args.index("--")) + 1:]
        found = users()
        if cli[:3] == ["admin", "user", "list"]:
            print("ID   Username        Email                 IsActive IsAdmin 2FA")
            for i, u in enumerate(found, 1):
                print("%d    %s   %s   true     true    false" % (i, u, found[u]["email"]))
        elif cli[:3] == ["admin", "user", "create"]:
            u = cli[cli.index("--username") + 1]
            if u in found:
                print("user already exists", file=sys.stderr)
                sys.exit(1)
            found[u] = {"email": cli[cli.index("--email") + 1],
                        "password": cli[cli.index("--password") + 1]}
            touch("users.json", json.dumps(found))
        elif cli[:3] == ["admin", "user", "change-password"]:
            found[cli[cli.index("--username") + 1]]["password"] = cli[cli.index("--password") + 1]
            touch("users.json", json.dumps(found))
        else:
            sys.exit(3)
    elif args[0] == "kubectl" and "apply" in args:
        src = Path(args[args.index("-f") + 1])
        touch("applied.json", json.dumps(sorted(p.name for p in src.iterdir())))
elif name == "aws":
    if os.environ.get("FAKE_AWS_ERROR"):
        print("An error occurred (AccessDeniedException) when calling the operation", file=sys.stderr)
        sys.exit(254)
    service, op = [a for a in args if not a.startswith("-")][1:3] if args[0] == "--region" else args[:2]
    param = state / "param.json"
    if (service, op) == ("ssm", "get-parameter"):
        if not param.exists():
            print("An error occurred (ParameterNotFound) when calling the GetParameter operation",
                  file=sys.stderr)
            sys.exit(254)
        stored = json.loads(param.read_text())
        print(stored["value"] if "--with-decryption" in args else stored["name"])
    elif (service, op) == ("ssm", "put-parameter"):
        if param.exists():
            print("An error occurred (ParameterAlreadyExists)", file=sys.stderr)
            sys.exit(254)
        value = opt("--value")
        assert value.startswith("file://"), value
        param.write_text(json.dumps({"name": opt("--name"), "type": opt("--type"),
                                     "value": Path(value[7:]).read_text()}))
    elif (service, op) == ("ec2", "describe-addresses"):
        print("203.0.113.10")
    else:
        sys.exit(2)
elif name == "python3":
    # The agent wrapper execs "$SPOTFORGE_PYTHON agent.py ARGS": this plays the agent.
    sub = args[1:]
    if sub and sub[0] == "mount-data":
        if os.environ.get("FAKE_MOUNT_FAILS_ONCE") and not flag("mount_failed"):
            touch("mount_failed")
            sys.exit(4)
        Path(root + os.environ["SPOTFORGE_MOUNT"]).mkdir(parents=True, exist_ok=True)
        touch("mounted")
    if sub and sub[0] == "set-phase":
        touch("phase", sub[1])
"""

FAKE_COMMANDS = [
    "sshd",
    "systemctl",
    "ss",
    "rpm",
    "dnf",
    "mountpoint",
    "getenforce",
    "curl",
    "k3s-install",
    "k3s",
    "aws",
    "python3",
]

SSHD_CONFIG_AL2023 = textwrap.dedent(
    """\
    # stock layout: drop-ins first, so their values win
    Include /etc/ssh/sshd_config.d/*.conf
    PermitRootLogin no
    Subsystem sftp /usr/libexec/openssh/sftp-server
    """
)


@dataclass
class Node:
    """A temporary node: root prefix, fake commands and their shared state."""

    base: Path
    root: Path
    state: Path
    env: dict[str, str]

    def calls(self, cmd: str | None = None) -> list[list[str]]:
        log = self.state / "calls.jsonl"
        if not log.exists():
            return []
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return [[e["cmd"], *e["args"]] for e in entries if cmd is None or e["cmd"] == cmd]

    def clear_calls(self) -> None:
        (self.state / "calls.jsonl").unlink(missing_ok=True)

    def bash(self, script: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run SCRIPT with the bootstrap library sourced, as the bootstrap itself would."""
        prelude = (
            "set -euo pipefail\n"
            f"SPOTFORGE_HOME={USERDATA}\n"
            f"source {USERDATA}/lib/common.sh\n"
            f"source {USERDATA}/lib/steps.sh\n"
        )
        done = subprocess.run(
            ["bash", "-c", prelude + script],
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"bash failed ({done.returncode}):\n{done.stderr}")
        return done

    def bootstrap(self, check: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", str(USERDATA / "bootstrap.sh")],
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"bootstrap failed ({done.returncode}):\n{done.stderr}")
        return done


def write_node_env(path: Path, domain: str = "git.example.com") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        textwrap.dedent(
            f"""\
            # written by the user data
            SPOTFORGE_STACK=spotforge
            SPOTFORGE_REGION=us-east-1
            SPOTFORGE_BUCKET=spotforge-backups
            SPOTFORGE_BACKUP_PREFIX=backups/
            SPOTFORGE_VOLUME_ID=vol-0123456789abcdef0
            SPOTFORGE_MOUNT={MOUNT}
            SPOTFORGE_DOMAIN="{domain}"
            SPOTFORGE_ACME_EMAIL=ops@example.com
            SPOTFORGE_EIP_ALLOCATION_ID=eipalloc-0123456789abcdef0
            SPOTFORGE_FORGEJO_IMAGE={IMAGE}
            SPOTFORGE_K3S_VERSION={K3S_VERSION}
            SPOTFORGE_BACKUP_INTERVAL_MINUTES=5
            SPOTFORGE_ADMIN_PASSWORD_PARAM={PARAM}
            """
        )
    )


@pytest.fixture
def node(tmp_path: Path) -> Node:
    root, state, fakes = tmp_path / "root", tmp_path / "state", tmp_path / "bin"
    for d in (root, state, fakes):
        d.mkdir()
    script = fakes / "fake.py"
    script.write_text(f"#!{sys.executable} -S\n" + FAKE)
    script.chmod(0o755)
    for cmd in FAKE_COMMANDS:
        (fakes / cmd).symlink_to(script)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True)
    (root / "etc/ssh/sshd_config").write_text(SSHD_CONFIG_AL2023)
    write_node_env(root / "etc/spotforge/node.env")
    env = {
        "PATH": f"{fakes}:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "SPOTFORGE_ROOT": str(root),
        "SPOTFORGE_JOURNAL": "0",
        "SPOTFORGE_SLEEP": "true",
        "SPOTFORGE_PYTHON": str(fakes / "python3"),
        "FAKE_STATE": str(state),
        "FAKE_TRAEFIK_IMAGE": TRAEFIK_IMAGE,
    }
    return Node(tmp_path, root, state, env)


# --- static checks ----------------------------------------------------------------------------


def test_every_shell_file_passes_shellcheck_at_style_severity() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is required (CI installs it with apt)"
    done = subprocess.run(
        [shellcheck, "-x", "-S", "style", *map(str, SHELL_FILES)],
        cwd=USERDATA,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_every_shell_file_parses_with_bash_n(path: Path) -> None:
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr


def test_no_shellcheck_warning_is_silenced_by_a_disable_directive() -> None:
    for path in SHELL_FILES:
        assert "shellcheck disable" not in path.read_text(), path


def test_each_script_stays_well_inside_the_user_data_budget() -> None:
    # The bundle is downloaded, not inlined, but each script is kept under the 16 KB user data
    # limit so it stays readable and could be inlined in an emergency.
    for path in SHELL_FILES:
        assert path.stat().st_size < 16 * 1024, path
    shipped = [p for p in USERDATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in shipped if p.suffix != ".py") < 64 * 1024
    assert all(b"\0" not in p.read_bytes() for p in shipped), "the bundle must hold no binaries"


def test_scripts_have_strict_mode_and_a_shebang() -> None:
    for path in (USERDATA / "bootstrap.sh", USERDATA / "bin" / "spotforge-agent"):
        text = path.read_text()
        assert text.startswith("#!/bin/bash\n"), path
        assert "set -euo pipefail" in text, path


# --- helpers ------------------------------------------------------------------------------------


def test_env_file_is_parsed_as_data_and_never_executed(node: Node) -> None:
    env_file = node.base / "evil.env"
    env_file.write_text(
        'SPOTFORGE_DOMAIN="git.example.com"\n'
        "SPOTFORGE_STACK=$(touch {pwned})\n"
        "PATH=/nowhere\n"
        "  # indented comment\n"
        "export SPOTFORGE_MOUNT='/srv/spotforge'\n".replace("{pwned}", str(node.base / "pwned"))
    )
    out = node.bash(
        f'load_env_file {env_file}; printf "%s|%s|%s|%s" "$SPOTFORGE_DOMAIN" "$SPOTFORGE_STACK" '
        '"$SPOTFORGE_MOUNT" "$PATH"'
    ).stdout
    domain, stack, mount, path = out.split("|")
    assert (domain, mount) == ("git.example.com", "/srv/spotforge")
    assert stack == f"$(touch {node.base / 'pwned'})"
    assert path == node.env["PATH"]
    assert not (node.base / "pwned").exists()


def test_env_file_values_do_not_override_the_callers_environment(node: Node) -> None:
    env_file = node.base / "node.env"
    env_file.write_text("SPOTFORGE_DOMAIN=from-file.example.com\n")
    out = node.bash(f'load_env_file {env_file}; echo "$SPOTFORGE_DOMAIN"', SPOTFORGE_DOMAIN="x.example.com")
    assert out.stdout.strip() == "x.example.com"


def test_missing_env_file_fails_with_one_clear_line(node: Node) -> None:
    done = node.bash("load_env_file /nonexistent/node.env", check=False)
    assert done.returncode != 0
    assert "/nonexistent/node.env" in done.stderr


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("codeberg.org/forgejo/forgejo:15.0.9", True),
        ("codeberg.org/forgejo/forgejo@sha256:" + "a" * 64, True),
        ("localhost:5000/forgejo:15", True),
        ("codeberg.org/forgejo/forgejo:latest", False),
        ("codeberg.org/forgejo/forgejo", False),
        ("localhost:5000/forgejo", False),
    ],
)
def test_only_pinned_images_pass_validation(node: Node, image: str, pinned: bool) -> None:
    done = node.bash(f"validate_image '{image}'", check=False)
    assert (done.returncode == 0) is pinned


def test_retry_gives_up_after_the_given_attempts_without_real_sleeps(node: Node) -> None:
    counter = node.base / "count"
    done = node.bash(f"retry 3 60 bash -c 'echo x >> {counter}; exit 1'", check=False)
    assert done.returncode == 1
    assert counter.read_text().count("x") == 3
    assert "giving up after 3 attempts" in done.stderr


def test_log_lines_carry_a_utc_timestamp_and_the_step(node: Node) -> None:
    done = node.bash('SPOTFORGE_STEP=sshd; log "hello"')
    assert done.stderr.startswith("20")
    assert "Z spotforge-bootstrap[sshd]: hello" in done.stderr


def test_renderer_substitutes_values_literally_including_ampersands(node: Node) -> None:
    template = node.base / "t.yaml"
    template.write_text('a: "${SPOTFORGE_ACME_EMAIL}"\nb: ${SPOTFORGE_MOUNT}/x\n')
    out = node.bash(
        f"render_template {template}", SPOTFORGE_ACME_EMAIL="a+b@x.org", SPOTFORGE_MOUNT="/srv/s"
    ).stdout
    assert out == 'a: "a+b@x.org"\nb: /srv/s/x\n'


@pytest.mark.parametrize("value", ['x"y', "x y", "a\nb", "${SPOTFORGE_MOUNT}", "x&y", "x\\y"])
def test_renderer_refuses_values_that_could_escape_a_yaml_scalar(node: Node, value: str) -> None:
    template = node.base / "t.yaml"
    template.write_text('host: "${SPOTFORGE_DOMAIN}"\n')
    done = node.bash(f"render_template {template}", check=False, SPOTFORGE_DOMAIN=value)
    assert done.returncode != 0
    assert "unsafe value for SPOTFORGE_DOMAIN" in done.stderr


def test_renderer_fails_on_an_unknown_placeholder(node: Node) -> None:
    template = node.base / "t.yaml"
    template.write_text("a: ${SPOTFORGE_NOT_A_VARIABLE}\n")
    done = node.bash(f"render_template {template}", check=False)
    assert done.returncode != 0
    assert "unrendered placeholder" in done.stderr


def test_variant_selection_keeps_shared_files_and_strips_the_variant_suffix(node: Node) -> None:
    for variant, other in (("domain", "ip"), ("ip", "domain")):
        out = node.bash(f"select_manifests {USERDATA}/manifests {variant}").stdout
        pairs = [line.split("\t") for line in out.splitlines()]
        sources = [Path(src).name for src, _ in pairs]
        names = [name for _, name in pairs]
        assert names == [
            "10-forgejo.yaml",
            "20-traefik-data.yaml",
            "30-forgejo-ingress.yaml",
            "40-forgejo-ssh.yaml",
        ]
        assert f"30-forgejo-ingress.{variant}.yaml" in sources
        assert f"30-forgejo-ingress.{other}.yaml" not in sources


def test_switching_variant_leaves_no_stale_rendered_file(node: Node) -> None:
    dest = node.base / "rendered"
    common = (
        f"SPOTFORGE_MOUNT={MOUNT} SPOTFORGE_FORGEJO_IMAGE={IMAGE} SPOTFORGE_PUBLIC_HOST=h.example.com "
        "SPOTFORGE_ROOT_URL=https://h.example.com/ SPOTFORGE_DOMAIN=h.example.com\n"
    )
    node.bash(common + f"render_dir {USERDATA}/manifests {dest} domain")
    (dest / "leftover.yaml").write_text("stale")
    node.bash(common + f"render_dir {USERDATA}/manifests {dest} ip")
    assert "leftover.yaml" not in [p.name for p in dest.iterdir()]
    assert "websecure" not in (dest / "30-forgejo-ingress.yaml").read_text()


# --- step 1: sshd -------------------------------------------------------------------------------


def test_sshd_moves_to_2222_through_a_drop_in_when_the_main_config_includes_them(node: Node) -> None:
    node.bash("configure_sshd")
    dropin = node.root / "etc/ssh/sshd_config.d/00-spotforge-port.conf"
    assert dropin.read_text() == "Port 2222\n"
    assert (node.root / "etc/ssh/sshd_config").read_text() == SSHD_CONFIG_AL2023
    assert ["systemctl", "restart", "sshd"] in node.calls("systemctl")


def test_second_sshd_run_changes_nothing_and_does_not_restart(node: Node) -> None:
    node.bash("configure_sshd")
    before = (node.root / "etc/ssh/sshd_config.d/00-spotforge-port.conf").stat().st_mtime_ns
    node.clear_calls()
    node.bash("configure_sshd")
    assert node.calls("systemctl") == []
    after = (node.root / "etc/ssh/sshd_config.d/00-spotforge-port.conf").stat().st_mtime_ns
    assert before == after


def test_sshd_restarts_again_when_an_earlier_run_died_before_the_restart(node: Node) -> None:
    node.bash("configure_sshd")
    (node.state / "sshd_on_2222").unlink()
    node.clear_calls()
    node.bash("configure_sshd")
    assert ["systemctl", "restart", "sshd"] in node.calls("systemctl")


def test_sshd_config_without_include_gets_port_2222_on_top_and_old_port_commented(node: Node) -> None:
    main = node.root / "etc/ssh/sshd_config"
    main.write_text("Port 22\nPermitRootLogin no\nMatch User git\n  X11Forwarding no\n")
    node.bash("configure_sshd")
    lines = main.read_text().splitlines()
    assert lines[0] == "Port 2222"
    assert "Port 22" not in lines
    assert any(line.startswith("# spotforge:") and line.endswith("Port 22") for line in lines)
    node.clear_calls()
    node.bash("configure_sshd")
    assert main.read_text().splitlines().count("Port 2222") == 1
    assert node.calls("systemctl") == []


def test_a_foreign_drop_in_that_keeps_port_22_is_neutralised(node: Node) -> None:
    other = node.root / "etc/ssh/sshd_config.d/50-site.conf"
    other.write_text("Port 22\nPasswordAuthentication no\n")
    node.bash("configure_sshd")
    assert "\nPort 22" not in "\n" + other.read_text()
    assert "PasswordAuthentication no" in other.read_text()
    assert node.calls("sshd"), "sshd -T must verify the result"
    done = node.bash("sshd_ports")
    assert done.stdout.split() == ["2222"]


def test_sshd_step_fails_when_sshd_t_still_reports_another_port(node: Node) -> None:
    # A Port line the step does not know how to remove (here: in an unmanaged include).
    (node.root / "etc/ssh/extra.conf").write_text("Port 22\n")
    main = node.root / "etc/ssh/sshd_config"
    main.write_text(SSHD_CONFIG_AL2023 + "Include /etc/ssh/extra.conf\n")
    done = node.bash("configure_sshd", check=False)
    assert done.returncode != 0
    assert "expected only 2222" in done.stderr


# --- step 2: units and the agent wrapper -----------------------------------------------------------


def test_units_are_installed_with_the_backup_interval_rendered(node: Node) -> None:
    home = node.base / "opt"
    shutil.copytree(USERDATA, home, ignore=shutil.ignore_patterns("__pycache__"))
    (home / "bin/spotforge-agent").chmod(0o644)  # zip assets may lose the executable bit
    node.bash(f"install_agent_and_units {home}", SPOTFORGE_BACKUP_INTERVAL_MINUTES="7")
    timer = (node.root / "etc/systemd/system/spotforge-backup.timer").read_text()
    assert "OnUnitActiveSec=7min" in timer and "${" not in timer
    installed = sorted(p.name for p in (node.root / "etc/systemd/system").iterdir())
    assert installed == sorted(p.name for p in UNITS.iterdir())
    assert os.stat(home / "bin/spotforge-agent").st_mode & stat.S_IXUSR
    assert os.readlink(node.root / "usr/local/bin/spotforge-agent") == "/opt/spotforge/bin/spotforge-agent"
    systemctl = node.calls("systemctl")
    assert ["systemctl", "daemon-reload"] in systemctl
    assert ["systemctl", "enable", "spotforge-bootstrap.service"] in systemctl


def test_wrapper_loads_the_node_env_and_runs_the_agent_on_the_given_python(node: Node) -> None:
    probe = node.base / "probe.py"
    probe.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'bucket': os.environ.get('SPOTFORGE_BUCKET')}))\n"
    )
    probe.chmod(0o755)
    done = subprocess.run(
        [str(USERDATA / "bin/spotforge-agent"), "drain", "--deadline", "20"],
        env={**node.env, "SPOTFORGE_PYTHON": str(probe)},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["argv"] == [str(USERDATA / "agent/spotforge_agent.py"), "drain", "--deadline", "20"]
    assert seen["bucket"] == "spotforge-backups"


def test_wrapper_fails_with_one_line_when_the_node_env_is_missing(node: Node) -> None:
    done = subprocess.run(
        [str(USERDATA / "bin/spotforge-agent"), "status"],
        env={**node.env, "SPOTFORGE_ENV_FILE": "/nonexistent.env"},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd unit files allow repeated keys, which configparser does not."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            assert current is not None, line
            current.setdefault(key, []).append(value)
    return sections


def test_watch_service_always_restarts_and_never_hits_a_start_limit() -> None:
    unit = parse_unit(UNITS / "spotforge-agent-watch.service")
    assert unit["Service"]["Restart"] == ["always"]
    assert unit["Service"]["ExecStart"] == ["/opt/spotforge/bin/spotforge-agent watch"]
    assert unit["Unit"]["StartLimitIntervalSec"] == ["0"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_backup_timer_fires_every_interval_even_before_the_first_backup() -> None:
    timer = parse_unit(UNITS / "spotforge-backup.timer")["Timer"]
    assert timer["OnUnitActiveSec"] == ["${SPOTFORGE_BACKUP_INTERVAL_MINUTES}min"]
    assert timer["OnActiveSec"] == ["${SPOTFORGE_BACKUP_INTERVAL_MINUTES}min"]
    assert timer["Unit"] == ["spotforge-backup.service"]
    service = parse_unit(UNITS / "spotforge-backup.service")["Service"]
    assert service["Type"] == ["oneshot"]
    assert service["ExecStart"] == ["/opt/spotforge/bin/spotforge-agent backup"]


def test_drain_on_stop_runs_before_k3s_stops() -> None:
    unit = parse_unit(UNITS / "spotforge-drain-on-stop.service")
    # Stop order is the reverse of start order: After=k3s means it stops first.
    assert "k3s.service" in " ".join(unit["Unit"]["After"]).split()
    assert unit["Service"]["ExecStop"] == ["/opt/spotforge/bin/spotforge-agent drain --deadline 20"]
    assert unit["Service"]["RemainAfterExit"] == ["yes"]
    assert int(unit["Service"]["TimeoutStopSec"][0]) > 20


def test_boot_time_bootstrap_neither_holds_the_boot_nor_orders_against_cloud_init() -> None:
    unit = parse_unit(UNITS / "spotforge-bootstrap.service")
    # cloud-final is ordered after multi-user.target; ordering after it from a unit that
    # multi-user.target wants would be a cycle.
    assert "cloud-final.service" not in " ".join(unit["Unit"].get("After", []))
    assert unit["Service"]["Type"] == ["simple"]
    assert unit["Service"]["Restart"] == ["on-failure"]
    assert unit["Unit"]["ConditionPathExists"] == ["/etc/spotforge/node.env"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    agent = tmp_path / "spotforge-agent"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    units = []
    for path in sorted(UNITS.iterdir()):
        # Rendered as the bootstrap would, with the agent path pointed at an existing file
        # because verify also checks that every Exec command exists.
        text = path.read_text().replace("${SPOTFORGE_BACKUP_INTERVAL_MINUTES}", "5")
        out = tmp_path / path.name
        out.write_text(text.replace("/opt/spotforge/bin/spotforge-agent", str(agent)))
        units.append(str(out))
    done = subprocess.run(
        ["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


def test_every_unit_uses_only_absolute_executables() -> None:
    for path in UNITS.iterdir():
        for key, values in parse_unit(path).get("Service", {}).items():
            if key.startswith("Exec"):
                assert all(v.startswith("/") for v in values), (path, key)


# --- step 3: k3s --------------------------------------------------------------------------------


def test_k3s_installs_pinned_with_traefik_config_written_before_it_starts(node: Node) -> None:
    node.bash("install_k3s $SPOTFORGE_HOME", SPOTFORGE_K3S_VERSION=K3S_VERSION, SPOTFORGE_MOUNT=MOUNT)
    seen = json.loads((node.state / "k3s_install.json").read_text())
    assert seen["env"] == {
        "INSTALL_K3S_VERSION": K3S_VERSION,
        "INSTALL_K3S_SKIP_SELINUX_RPM": "true",
        "INSTALL_K3S_SELINUX_WARN": "true",
    }
    assert seen["traefik_config"] and seen["k3s_config"]
    config = (node.root / "etc/rancher/k3s/config.yaml").read_text()
    assert "- metrics-server" in config
    assert [c for c in node.calls("curl") if "https://get.k3s.io" in c]


def test_k3s_at_the_pinned_version_is_not_reinstalled(node: Node) -> None:
    node.bash("install_k3s $SPOTFORGE_HOME", SPOTFORGE_K3S_VERSION=K3S_VERSION, SPOTFORGE_MOUNT=MOUNT)
    node.clear_calls()
    node.bash("install_k3s $SPOTFORGE_HOME", SPOTFORGE_K3S_VERSION=K3S_VERSION, SPOTFORGE_MOUNT=MOUNT)
    assert node.calls("curl") == [] and node.calls("k3s-install") == []


def test_a_new_pinned_version_reinstalls_k3s(node: Node) -> None:
    node.bash("install_k3s $SPOTFORGE_HOME", SPOTFORGE_K3S_VERSION=K3S_VERSION, SPOTFORGE_MOUNT=MOUNT)
    node.bash("install_k3s $SPOTFORGE_HOME", SPOTFORGE_K3S_VERSION="v1.34.1+k3s1", SPOTFORGE_MOUNT=MOUNT)
    assert (node.state / "k3s_version").read_text() == "v1.34.1+k3s1"


# --- step 7: volume layout -----------------------------------------------------------------------


def test_volume_layout_is_refused_when_the_volume_is_not_mounted(node: Node) -> None:
    done = node.bash("prepare_volume_dirs", check=False, SPOTFORGE_MOUNT=MOUNT)
    assert done.returncode != 0
    assert not (node.root / MOUNT.lstrip("/") / "forgejo").exists()


def test_volume_layout_sets_owners_and_keeps_acme_json_private(node: Node) -> None:
    (node.state / "mounted").touch()
    mount = node.root / MOUNT.lstrip("/")
    (mount / "traefik").mkdir(parents=True)
    acme = mount / "traefik/acme.json"
    acme.write_text('{"letsencrypt": {}}')
    acme.chmod(0o644)
    for _ in range(2):
        node.bash("prepare_volume_dirs", SPOTFORGE_MOUNT=MOUNT)
    assert acme.read_text() == '{"letsencrypt": {}}', "an existing certificate store must survive"
    assert stat.S_IMODE(acme.stat().st_mode) == 0o600
    if os.geteuid() == 0:
        assert (acme.stat().st_uid, acme.stat().st_gid) == (65532, 65532)
        assert (mount / "traefik").stat().st_uid == 65532
        assert (mount / "forgejo").stat().st_uid == 1000
    assert stat.S_IMODE((mount / "traefik").stat().st_mode) == 0o700


def test_a_blank_volume_gets_an_empty_private_acme_json(node: Node) -> None:
    (node.state / "mounted").touch()
    node.bash("prepare_volume_dirs", SPOTFORGE_MOUNT=MOUNT)
    acme = node.root / MOUNT.lstrip("/") / "traefik/acme.json"
    assert acme.read_text() == ""
    assert stat.S_IMODE(acme.stat().st_mode) == 0o600


# --- step 7: admin user ------------------------------------------------------------------------


def env_for_admin() -> dict[str, str]:
    return {
        "SPOTFORGE_ADMIN_PASSWORD_PARAM": PARAM,
        "SPOTFORGE_REGION": "us-east-1",
        "SPOTFORGE_ACME_EMAIL": "ops@example.com",
    }


def test_first_node_stores_a_generated_password_then_creates_the_admin(node: Node) -> None:
    node.bash("ensure_admin_user", **env_for_admin())
    param = json.loads((node.state / "param.json").read_text())
    users = json.loads((node.state / "users.json").read_text())
    assert param["type"] == "SecureString" and param["name"] == PARAM
    assert len(param["value"]) >= 24 and param["value"].isalnum()
    assert users == {"forgejo-admin": {"email": "ops@example.com", "password": param["value"]}}
    flat = json.dumps(node.calls("aws"))
    assert param["value"] not in flat, "the password must not appear on a command line"


def test_a_new_node_never_resets_an_existing_admin_password(node: Node) -> None:
    node.bash("ensure_admin_user", **env_for_admin())
    before = (node.state / "param.json").read_text(), (node.state / "users.json").read_text()
    node.clear_calls()
    node.bash("ensure_admin_user", **env_for_admin())
    assert ((node.state / "param.json").read_text(), (node.state / "users.json").read_text()) == before
    assert not [c for c in node.calls("aws") if "put-parameter" in c]
    assert not [c for c in node.calls("k3s") if "create" in c or "change-password" in c]


def test_stored_password_without_user_creates_the_user_with_that_password(node: Node) -> None:
    (node.state / "param.json").write_text(json.dumps({"name": PARAM, "value": "StoredPw123"}))
    node.bash("ensure_admin_user", **env_for_admin())
    users = json.loads((node.state / "users.json").read_text())
    assert users["forgejo-admin"]["password"] == "StoredPw123"


def test_restored_user_without_parameter_gets_the_new_stored_password(node: Node) -> None:
    (node.state / "users.json").write_text(
        json.dumps({"forgejo-admin": {"email": "old@example.com", "password": "forgotten"}})
    )
    node.bash("ensure_admin_user", **env_for_admin())
    stored = json.loads((node.state / "param.json").read_text())["value"]
    assert json.loads((node.state / "users.json").read_text())["forgejo-admin"]["password"] == stored


def test_an_unreachable_forgejo_stops_the_step_before_any_password_is_stored(node: Node) -> None:
    done = node.bash("ensure_admin_user", check=False, FAKE_FORGEJO_DOWN="1", **env_for_admin())
    assert done.returncode != 0
    assert "cannot list Forgejo users" in done.stderr
    assert not (node.state / "param.json").exists()


def test_an_unreadable_parameter_stops_the_step_without_touching_the_password(node: Node) -> None:
    done = node.bash("ensure_admin_user", check=False, FAKE_AWS_ERROR="1", **env_for_admin())
    assert done.returncode != 0
    assert "cannot tell whether" in done.stderr
    assert not (node.state / "users.json").exists()


# --- the whole bootstrap ------------------------------------------------------------------------


def call_index(calls: list[list[str]], predicate: object) -> int:
    for i, call in enumerate(calls):
        if predicate(call):  # type: ignore[operator]
            return i
    raise AssertionError("call not found")


def test_full_bootstrap_runs_the_steps_in_the_documented_order(node: Node) -> None:
    done = node.bootstrap()
    calls = node.calls()

    def is_agent(sub: str, *rest: str):
        return lambda c: c[0] == "python3" and c[2:] == [sub, *rest]

    sshd_restart = call_index(calls, lambda c: c == ["systemctl", "restart", "sshd"])
    packages = call_index(calls, lambda c: c[0] == "dnf")
    install = call_index(calls, lambda c: c[0] == "k3s-install")
    pulled = call_index(calls, lambda c: c[:3] == ["k3s", "crictl", "pull"] and IMAGE in c)
    standby = call_index(calls, is_agent("set-phase", "standby"))
    mount = call_index(calls, is_agent("mount-data"))
    apply = call_index(calls, lambda c: c[0] == "k3s" and "apply" in c)
    admin = call_index(calls, lambda c: c[0] == "k3s" and "create" in c)
    serving = call_index(calls, is_agent("set-phase", "serving"))
    enable = call_index(calls, lambda c: c[:3] == ["systemctl", "enable", "--now"])
    assert sshd_restart < packages < install < pulled < standby < mount < apply < admin < serving < enable
    assert json.loads((node.state / "k3s_install.json").read_text())["sshd_moved"]
    assert (node.state / "phase").read_text() == "serving"
    assert "node is serving" in done.stderr
    assert set(calls[enable][3:]) == {
        "spotforge-agent-watch.service",
        "spotforge-backup.timer",
        "spotforge-drain-on-stop.service",
    }
    applied = json.loads((node.state / "applied.json").read_text())
    assert applied == [
        "10-forgejo.yaml",
        "20-traefik-data.yaml",
        "30-forgejo-ingress.yaml",
        "40-forgejo-ssh.yaml",
    ]
    assert TRAEFIK_IMAGE in (node.state / "images").read_text()
    deletes = [i for i, c in enumerate(calls) if c[0] == "k3s" and "delete" in c]
    assert deletes and max(deletes) < apply, "stuck pods are recreated before the apply"
    assert all("--field-selector=status.phase!=Running" in calls[i] for i in deletes)


def test_second_bootstrap_run_only_rechecks(node: Node) -> None:
    node.bootstrap()
    param = (node.state / "param.json").read_text()
    node.clear_calls()
    node.bootstrap()
    calls = node.calls()
    assert not [c for c in calls if c == ["systemctl", "restart", "sshd"]]
    assert not [c for c in calls if c[0] in ("dnf", "k3s-install")]
    assert not [c for c in calls if c[:3] == ["k3s", "crictl", "pull"]]
    assert not [c for c in calls if "put-parameter" in c or "create" in c]
    assert (node.state / "param.json").read_text() == param
    assert (node.state / "phase").read_text() == "serving"


def test_bootstrap_keeps_waiting_for_the_volume_until_mount_data_succeeds(node: Node) -> None:
    done = node.bootstrap(FAKE_MOUNT_FAILS_ONCE="1")
    mounts = [c for c in node.calls("python3") if c[2:3] == ["mount-data"]]
    assert len(mounts) == 2
    assert "retrying" in done.stderr


def test_without_a_domain_the_site_is_served_on_the_elastic_ip_over_http(node: Node) -> None:
    write_node_env(node.root / "etc/spotforge/node.env", domain="")
    node.bootstrap()
    rendered = node.root / "var/lib/spotforge/manifests"
    forgejo = (rendered / "10-forgejo.yaml").read_text()
    assert '"http://203.0.113.10/"' in forgejo
    traefik = (node.root / "var/lib/rancher/k3s/server/manifests/spotforge-traefik-config.yaml").read_text()
    assert "redirections" not in traefik
    assert [c for c in node.calls("aws") if "describe-addresses" in c]


def test_the_public_ip_from_the_node_env_spares_the_address_lookup(node: Node) -> None:
    out = node.bash("public_host", SPOTFORGE_DOMAIN="", SPOTFORGE_PUBLIC_IP="198.51.100.7").stdout
    assert out.strip() == "198.51.100.7"
    assert node.calls("aws") == []
    domain = node.bash("public_host", SPOTFORGE_DOMAIN="git.example.com", SPOTFORGE_PUBLIC_IP="198.51.100.7")
    assert domain.stdout.strip() == "git.example.com"


def test_bootstrap_refuses_a_moving_image_tag_before_touching_anything(node: Node) -> None:
    env_file = node.root / "etc/spotforge/node.env"
    env_file.write_text(env_file.read_text().replace(IMAGE, "codeberg.org/forgejo/forgejo:latest"))
    done = node.bootstrap(check=False)
    assert done.returncode != 0
    assert "pinned" in done.stderr
    assert node.calls() == []


def test_bootstrap_names_a_missing_setting(node: Node) -> None:
    env_file = node.root / "etc/spotforge/node.env"
    env_file.write_text(env_file.read_text().replace("SPOTFORGE_VOLUME_ID=", "#"))
    done = node.bootstrap(check=False)
    assert done.returncode != 0
    assert "SPOTFORGE_VOLUME_ID is not set" in done.stderr
