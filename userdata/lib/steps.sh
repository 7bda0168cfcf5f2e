# shellcheck shell=bash
# The bootstrap steps, one function each, every one safe to run again. Sourced after common.sh.

SSHD_PORT=2222
SSHD_DROPIN=/etc/ssh/sshd_config.d/00-spotforge-port.conf
FORGEJO_UID=1000
TRAEFIK_UID=65532
ADMIN_USER=forgejo-admin
K3S_MANIFESTS=/var/lib/rancher/k3s/server/manifests
RENDERED=/var/lib/spotforge/manifests
PACKAGES=(sqlite python3-boto3 git e2fsprogs awscli-2 util-linux)

kubectl_() { k3s kubectl "$@"; }

# --- 1. host sshd on 2222 -------------------------------------------------------------------

sshd_ports() {
  sshd -T -f "$R/etc/ssh/sshd_config" | awk '$1 == "port" { print $2 }' | sort -u
}

# Port lines add up instead of overriding, so any other Port line (main file or someone else's
# drop-in) must be commented out, not merely outranked.
comment_out_other_ports() {
  local f ours="^[[:space:]]*Port[[:space:]]+${SSHD_PORT}[[:space:]]*\$" any='^[[:space:]]*Port[[:space:]]'
  for f in "$R/etc/ssh/sshd_config" "$R"/etc/ssh/sshd_config.d/*.conf; do
    [[ -f "$f" && "$f" != "$R$SSHD_DROPIN" ]] || continue
    if grep -Ev "$ours" "$f" | grep -Eq "$any"; then
      sed -i -E "/$ours/!s/($any.*)\$/# spotforge: git SSH owns 22 # \\1/" "$f"
      log "commented out Port lines in $f"
    fi
  done
}

configure_sshd() {
  local main="$R/etc/ssh/sshd_config" changed=0 want="Port $SSHD_PORT"
  [[ -f "$main" ]] || die "no $main"
  if grep -Eq '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config\.d/\*\.conf' "$main"; then
    if [[ "$(cat "$R$SSHD_DROPIN" 2>/dev/null)" != "$want" ]]; then
      mkdir -p "$(dirname "$R$SSHD_DROPIN")"
      printf '%s\n' "$want" >"$R$SSHD_DROPIN"
      changed=1
    fi
  elif ! grep -Eq "^Port $SSHD_PORT\$" "$main"; then
    # Prepended: a Port line appended after a Match block would be inside the Match.
    sed -i "1i $want" "$main"
    changed=1
  fi
  if [[ "$(sshd_ports)" != "$SSHD_PORT" ]]; then
    comment_out_other_ports
    changed=1
  fi
  local ports
  ports="$(sshd_ports | tr '\n' ' ')"
  [[ "$ports" == "$SSHD_PORT " ]] || die "sshd -T reports ports '$ports', expected only $SSHD_PORT"
  if command -v getenforce >/dev/null 2>&1 && [[ "$(getenforce)" == Enforcing ]]; then
    semanage port -a -t ssh_port_t -p tcp "$SSHD_PORT" 2>/dev/null ||
      semanage port -m -t ssh_port_t -p tcp "$SSHD_PORT"
  fi
  # Also restart when a previous run wrote the config but died before the restart.
  if [[ "$changed" == 1 ]] || ! ss -Hltn "sport = :$SSHD_PORT" | grep -q .; then
    systemctl restart sshd
    log "sshd restarted on port $SSHD_PORT"
  else
    log "sshd already on port $SSHD_PORT"
  fi
}

# --- 2. packages, agent wrapper, units -------------------------------------------------------

install_packages() {
  if rpm -q "${PACKAGES[@]}" >/dev/null 2>&1; then
    log "packages present"
    return 0
  fi
  retry 5 10 dnf -y install "${PACKAGES[@]}"
}

install_agent_and_units() {
  local home="$1" unit name
  chmod 0755 "$home/bin/spotforge-agent"
  mkdir -p "$R/usr/local/bin" "$R/etc/systemd/system"
  ln -sfn "/opt/spotforge/bin/spotforge-agent" "$R/usr/local/bin/spotforge-agent"
  for unit in "$home"/systemd/*.service "$home"/systemd/*.timer; do
    [[ -e "$unit" ]] || continue
    name="$(basename "$unit")"
    render_template "$unit" >"$R/etc/systemd/system/$name.tmp" || return 1
    mv "$R/etc/systemd/system/$name.tmp" "$R/etc/systemd/system/$name"
  done
  systemctl daemon-reload
  # Later boots re-run the (idempotent) bootstrap; the first boot is driven by user data.
  systemctl enable spotforge-bootstrap.service
}

# --- 3. k3s ---------------------------------------------------------------------------------

write_k3s_config() {
  mkdir -p "$R/etc/rancher/k3s"
  # State stays on the root volume: each node builds a fresh cluster from the manifests.
  cat >"$R/etc/rancher/k3s/config.yaml" <<'EOF'
# written by spotforge bootstrap
write-kubeconfig-mode: "0600"
disable:
  - metrics-server
  - local-storage
EOF
}

write_traefik_config() {
  local home="$1" variant
  variant="$(manifest_variant)"
  mkdir -p "$R$K3S_MANIFESTS"
  render_template "$home/manifests/k3s/traefik-config.$variant.yaml" \
    >"$R$K3S_MANIFESTS/spotforge-traefik-config.yaml.tmp" || return 1
  mv "$R$K3S_MANIFESTS/spotforge-traefik-config.yaml.tmp" "$R$K3S_MANIFESTS/spotforge-traefik-config.yaml"
}

k3s_at_version() {
  command -v k3s >/dev/null 2>&1 &&
    [[ "$(k3s --version 2>/dev/null | awk 'NR == 1 { print $3 }')" == "$SPOTFORGE_K3S_VERSION" ]]
}

install_k3s() {
  local home="$1" script
  write_k3s_config
  write_traefik_config "$home"
  if k3s_at_version; then
    log "k3s $SPOTFORGE_K3S_VERSION present"
    systemctl is-active --quiet k3s || systemctl start k3s
    return 0
  fi
  script="$(mktemp)"
  retry 5 10 curl -sfL https://get.k3s.io -o "$script"
  # The SELinux RPM does not load on AL2023 arm64; the host is permissive, so skip it.
  INSTALL_K3S_VERSION="$SPOTFORGE_K3S_VERSION" INSTALL_K3S_SKIP_SELINUX_RPM=true \
    INSTALL_K3S_SELINUX_WARN=true sh "$script"
  rm -f "$script"
  log "k3s $SPOTFORGE_K3S_VERSION installed"
}

# --- 4. images and readiness ----------------------------------------------------------------

pull_image() {
  local image="$1"
  if k3s crictl inspecti "$image" >/dev/null 2>&1; then
    log "image present: $image"
  else
    retry 5 10 k3s crictl pull "$image" >/dev/null
    log "image pulled: $image"
  fi
}

traefik_image() {
  kubectl_ -n kube-system get deployment traefik -o 'jsonpath={.spec.template.spec.containers[0].image}'
}

wait_for_cluster() {
  retry 60 5 kubectl_ wait --for=condition=Ready node --all --timeout=30s >/dev/null
  log "k3s node Ready"
  # Traefik's pod waits for its claim until the volume is mounted; pulling now keeps that
  # pull out of the handoff's downtime.
  local image
  image="$(retry 60 5 traefik_image)" || return 1
  [[ -n "$image" ]] || die "traefik deployment has no image"
  pull_image "$image"
}

# --- 6. data volume -------------------------------------------------------------------------

mount_data() {
  local home="$1"
  retry 0 10 "$home/bin/spotforge-agent" mount-data
  mountpoint -q "$R$SPOTFORGE_MOUNT" || die "$SPOTFORGE_MOUNT is not a mount point after mount-data"
  log "data volume mounted at $SPOTFORGE_MOUNT"
}

# --- 7. volume layout, manifests, admin -----------------------------------------------------

prepare_volume_dirs() {
  local m="$R$SPOTFORGE_MOUNT"
  # Never lay out the tree on the root disk: Forgejo and Traefik would start on empty data.
  mountpoint -q "$m" || die "$SPOTFORGE_MOUNT is not mounted"
  mkdir -p "$m/forgejo" "$m/traefik"
  # The image's s6 scripts chown inside /data; the top level must already be git's (uid 1000).
  chown "$FORGEJO_UID:$FORGEJO_UID" "$m/forgejo"
  chmod 0755 "$m/forgejo"
  # hostPath volumes ignore fsGroup, so Traefik's uid must own its dir and the ACME store, and
  # Traefik refuses an acme.json readable by anyone else.
  chown "$TRAEFIK_UID:$TRAEFIK_UID" "$m/traefik"
  chmod 0700 "$m/traefik"
  [[ -e "$m/traefik/acme.json" ]] || : >"$m/traefik/acme.json"
  chown "$TRAEFIK_UID:$TRAEFIK_UID" "$m/traefik/acme.json"
  chmod 0600 "$m/traefik/acme.json"
  log "volume layout ready"
}

public_host() {
  if [[ -n "${SPOTFORGE_DOMAIN:-}" ]]; then
    printf '%s\n' "$SPOTFORGE_DOMAIN"
  elif [[ -n "${SPOTFORGE_PUBLIC_IP:-}" ]]; then
    printf '%s\n' "$SPOTFORGE_PUBLIC_IP"
  else
    retry 10 3 aws --region "$(node_region)" ec2 describe-addresses \
      --allocation-ids "$SPOTFORGE_EIP_ALLOCATION_ID" --query 'Addresses[0].PublicIp' --output text
  fi
}

set_render_context() {
  SPOTFORGE_PUBLIC_HOST="$(public_host)" || die "cannot resolve the public host"
  [[ -n "$SPOTFORGE_PUBLIC_HOST" && "$SPOTFORGE_PUBLIC_HOST" != None ]] || die "no public host"
  if [[ -n "${SPOTFORGE_DOMAIN:-}" ]]; then
    SPOTFORGE_ROOT_URL="https://$SPOTFORGE_PUBLIC_HOST/"
  else
    SPOTFORGE_ROOT_URL="http://$SPOTFORGE_PUBLIC_HOST/"
  fi
  export SPOTFORGE_PUBLIC_HOST SPOTFORGE_ROOT_URL
}

# After a reboot the old cluster state comes back and its pods try their hostPaths before the
# volume is mounted; kubelet's back-off would then hold them for up to minutes. Recreating the
# ones not running starts them at once (on a first boot there is nothing to delete).
restart_stuck_pods() {
  local ns_app ns app
  for ns_app in kube-system/traefik forgejo/forgejo; do
    ns="${ns_app%/*}" app="${ns_app#*/}"
    kubectl_ -n "$ns" delete pod -l "app.kubernetes.io/name=$app" \
      --field-selector=status.phase!=Running --ignore-not-found --wait=false >/dev/null || true
  done
}

apply_manifests() {
  local home="$1"
  render_dir "$home/manifests" "$R$RENDERED" "$(manifest_variant)" || die "manifest rendering failed"
  restart_stuck_pods
  retry 12 5 kubectl_ apply -f "$R$RENDERED" >/dev/null
  log "manifests applied ($(manifest_variant) variant)"
}

wait_for_forgejo() {
  # Migrations after a version bump can take minutes.
  retry 60 10 kubectl_ -n forgejo rollout status deployment/forgejo --timeout=60s >/dev/null
  log "forgejo ready"
}

forgejo_cli() {
  kubectl_ -n forgejo exec deployment/forgejo -c forgejo -- su-exec git forgejo "$@"
}

admin_user_exists() {
  local listing
  # A failed listing must stop the step: read as "no user" it would reset the password.
  listing="$(forgejo_cli admin user list --admin)" || die "cannot list Forgejo users"
  awk 'NR > 1 { print $2 }' <<<"$listing" | grep -qx "$ADMIN_USER"
}

# 0: parameter exists, 1: it does not, 2: the answer is unknown (never treat as missing, or a
# transient error would reset the password).
admin_param_state() {
  local err
  if err="$(aws --region "$(node_region)" ssm get-parameter --name "$SPOTFORGE_ADMIN_PASSWORD_PARAM" \
    --query Parameter.Name --output text 2>&1 >/dev/null)"; then
    return 0
  fi
  [[ "$err" == *ParameterNotFound* ]] && return 1
  log "ssm get-parameter failed: $err"
  return 2
}

store_admin_password() {
  local password="$1" file rc=0
  file="$(mktemp)"
  chmod 0600 "$file"
  # Through a file so the password never appears in a process list.
  printf '%s' "$password" >"$file"
  aws --region "$(node_region)" ssm put-parameter --name "$SPOTFORGE_ADMIN_PASSWORD_PARAM" \
    --type SecureString --value "file://$file" >/dev/null || rc=$?
  rm -f "$file"
  return "$rc"
}

ensure_admin_user() {
  local password state=0 email="${SPOTFORGE_ACME_EMAIL:-}"
  [[ -n "$email" ]] || email="$ADMIN_USER@spotforge.invalid"
  admin_param_state || state=$?
  [[ "$state" != 2 ]] || die "cannot tell whether $SPOTFORGE_ADMIN_PASSWORD_PARAM exists"
  if [[ "$state" == 0 ]]; then
    if admin_user_exists; then
      log "admin user and password parameter already exist"
      return 0
    fi
    # An earlier node stored the password but died before creating the user.
    password="$(aws --region "$(node_region)" ssm get-parameter --with-decryption \
      --name "$SPOTFORGE_ADMIN_PASSWORD_PARAM" --query Parameter.Value --output text)" || return 1
  else
    local existing=0
    # Asked before anything is stored, so a failed listing leaves no parameter behind that
    # would later be mistaken for this user's password.
    if admin_user_exists; then existing=1; fi
    password="$(head -c 24 /dev/urandom | base64 | tr -d '/+=\n')"
    # Stored before the user is created: a crash in between is repaired by the branch above.
    store_admin_password "$password" || die "cannot store the admin password"
    if [[ "$existing" == 1 ]]; then
      # A restored volume whose password nobody holds any more: align it with the new parameter.
      forgejo_cli admin user change-password --username "$ADMIN_USER" --password "$password" \
        --must-change-password=false >/dev/null
      log "admin password reset to the new parameter"
      return 0
    fi
  fi
  forgejo_cli admin user create --username "$ADMIN_USER" --email "$email" --admin \
    --password "$password" --must-change-password=false >/dev/null
  log "admin user $ADMIN_USER created"
}

# --- 8. serving ----------------------------------------------------------------------------

enable_node_services() {
  systemctl enable --now spotforge-agent-watch.service spotforge-backup.timer \
    spotforge-drain-on-stop.service
  log "watch, backup timer and drain-on-stop enabled"
}
