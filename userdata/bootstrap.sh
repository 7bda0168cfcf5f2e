#!/bin/bash
# spotforge node bootstrap: run as root by the user data at first boot (and by
# spotforge-bootstrap.service on later boots). Every step is idempotent, so a second run only
# re-checks. Step order matters: sshd leaves 22 before k3s can bind it for git, and the node
# reports standby (so the controller attaches the data volume) before it waits for the volume.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

SPOTFORGE_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/common.sh
source "$SPOTFORGE_HOME/lib/common.sh"
# shellcheck source=lib/steps.sh
source "$SPOTFORGE_HOME/lib/steps.sh"

REQUIRED_ENV=(
  SPOTFORGE_STACK SPOTFORGE_BUCKET SPOTFORGE_VOLUME_ID SPOTFORGE_MOUNT SPOTFORGE_EIP_ALLOCATION_ID
  SPOTFORGE_FORGEJO_IMAGE SPOTFORGE_K3S_VERSION SPOTFORGE_BACKUP_INTERVAL_MINUTES
  SPOTFORGE_ADMIN_PASSWORD_PARAM
)

check_env() {
  local name
  for name in "${REQUIRED_ENV[@]}"; do
    [[ -n "${!name:-}" ]] || die "$name is not set in the node environment"
  done
  [[ "$SPOTFORGE_MOUNT" == /* ]] || die "SPOTFORGE_MOUNT must be an absolute path"
  [[ "$SPOTFORGE_BACKUP_INTERVAL_MINUTES" =~ ^[1-9][0-9]*$ ]] ||
    die "SPOTFORGE_BACKUP_INTERVAL_MINUTES must be a positive integer"
  validate_image "$SPOTFORGE_FORGEJO_IMAGE" || die "SPOTFORGE_FORGEJO_IMAGE must carry a pinned tag or digest"
}

step() {
  SPOTFORGE_STEP="$1"
  shift
  log "start"
  "$@"
  log "done"
}

main() {
  [[ -n "$R" || "$(id -u)" == 0 ]] || die "must run as root"
  mkdir -p "$R/run"
  # One bootstrap at a time: user data and the boot unit must never interleave.
  exec 9>"$R/run/spotforge-bootstrap.lock"
  flock 9
  load_env_file "${SPOTFORGE_ENV_FILE:-$R/etc/spotforge/node.env}" || die "no node environment"
  check_env

  step sshd configure_sshd
  step packages install_packages
  step units install_agent_and_units "$SPOTFORGE_HOME"
  step k3s install_k3s "$SPOTFORGE_HOME"
  # The pull overlaps with k3s bringing up its system pods (it retries until containerd is up).
  step images pull_image "$SPOTFORGE_FORGEJO_IMAGE"
  step cluster wait_for_cluster
  step standby tag_phase standby
  step mount mount_data "$SPOTFORGE_HOME"
  step layout prepare_volume_dirs
  step render set_render_context
  step apply apply_manifests "$SPOTFORGE_HOME"
  step forgejo wait_for_forgejo
  step admin ensure_admin_user
  step serving tag_phase serving
  step services enable_node_services
  SPOTFORGE_STEP=end
  log "node is serving"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
