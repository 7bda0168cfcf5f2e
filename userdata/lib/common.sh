# shellcheck shell=bash
# Shared helpers for the node bootstrap and the agent wrapper. Sourced, never executed.
# Every path the node writes goes through "$R" (SPOTFORGE_ROOT, empty on a real node) so the
# tests can run each step against a temporary directory with fake commands on PATH.

R=""
: "${R:=${SPOTFORGE_ROOT:-}}"
SPOTFORGE_STEP="${SPOTFORGE_STEP:-init}"

# Values substituted into manifests and units. Anything outside this set of characters could
# break out of a YAML scalar or a unit line, so it is refused rather than escaped.
SPOTFORGE_SAFE_VALUE_RE='^[A-Za-z0-9._:/@+-]*$'

# Placeholders the templates may use; the Python tests render with the same list.
SPOTFORGE_TEMPLATE_VARS=(
  SPOTFORGE_MOUNT SPOTFORGE_FORGEJO_IMAGE SPOTFORGE_DOMAIN SPOTFORGE_ACME_EMAIL
  SPOTFORGE_PUBLIC_HOST SPOTFORGE_ROOT_URL SPOTFORGE_BACKUP_INTERVAL_MINUTES
)

log() {
  local msg
  msg="$(date -u +%Y-%m-%dT%H:%M:%SZ) spotforge-bootstrap[${SPOTFORGE_STEP}]: $*"
  printf '%s\n' "$msg" >&2
  # cloud-init keeps stderr in its own log; the journal copy is what `journalctl -t` finds.
  if [[ "${SPOTFORGE_JOURNAL:-1}" == 1 ]] && command -v logger >/dev/null 2>&1; then
    logger -t spotforge-bootstrap -- "[${SPOTFORGE_STEP}] $*" 2>/dev/null || true
  fi
}

die() {
  log "ERROR: $*"
  exit 1
}

nap() {
  # Injected so tests never really sleep.
  "${SPOTFORGE_SLEEP:-sleep}" "$1"
}

# retry ATTEMPTS DELAY CMD... ; ATTEMPTS=0 retries forever (a standby node may wait long).
retry() {
  local attempts="$1" delay="$2" n=1
  shift 2
  until "$@"; do
    if [[ "$attempts" != 0 && "$n" -ge "$attempts" ]]; then
      log "giving up after $n attempts: $*"
      return 1
    fi
    log "attempt $n failed, retrying in ${delay}s: $*"
    n=$((n + 1))
    nap "$delay"
  done
}

# KEY=VALUE lines (optionally quoted); only SPOTFORGE_* keys, and a variable already in the
# environment wins so an operator can override one value for a single run. The file is parsed,
# not sourced: it is data written by user data and must never run as code.
load_env_file() {
  local file="$1" line key value
  [[ -r "$file" ]] || {
    printf 'spotforge: environment file %s is missing or unreadable\n' "$file" >&2
    return 1
  }
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line#"${line%%[![:space:]]*}"}"
    [[ -z "$line" || "$line" == \#* ]] && continue
    line="${line#export }"
    key="${line%%=*}"
    value="${line#*=}"
    [[ "$line" == *=* && "$key" =~ ^SPOTFORGE_[A-Z0-9_]+$ ]] || continue
    if [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]]; then
      value="${BASH_REMATCH[1]}"
    fi
    if [[ -z "${!key+set}" ]]; then
      export "$key=$value"
    fi
  done <"$file"
}

# render_template FILE: print FILE with every ${NAME} from SPOTFORGE_TEMPLATE_VARS replaced by
# its value. Fails on an unsafe value or on a placeholder left unrendered.
render_template() {
  local file="$1" content name value
  content="$(<"$file")"
  for name in "${SPOTFORGE_TEMPLATE_VARS[@]}"; do
    value="${!name-}"
    if ! [[ "$value" =~ $SPOTFORGE_SAFE_VALUE_RE ]]; then
      log "refusing unsafe value for $name"
      return 1
    fi
    # Quoted pattern and replacement: no globbing, and bash 5.2's `&` replacement stays off.
    content="${content//"\${$name}"/"$value"}"
  done
  if [[ "$content" == *"\${"* ]]; then
    log "unrendered placeholder left in $file"
    return 1
  fi
  printf '%s\n' "$content"
}

# Manifest variants: NAME.domain.yaml only with a domain, NAME.ip.yaml only without, any other
# *.yaml always. Prints "source<TAB>output-name" pairs in apply order.
select_manifests() {
  local dir="$1" variant="$2" f base
  for f in "$dir"/*.yaml; do
    [[ -e "$f" ]] || continue
    base="$(basename "$f")"
    case "$base" in
      *.domain.yaml) [[ "$variant" == domain ]] || continue; base="${base%.domain.yaml}.yaml" ;;
      *.ip.yaml) [[ "$variant" == ip ]] || continue; base="${base%.ip.yaml}.yaml" ;;
    esac
    printf '%s\t%s\n' "$f" "$base"
  done
}

# render_dir SRC DEST VARIANT: DEST is rebuilt from scratch so a variant switch leaves no
# stale file behind.
render_dir() {
  local src="$1" dest="$2" variant="$3" f out
  rm -rf "$dest"
  mkdir -p "$dest"
  while IFS=$'\t' read -r f out; do
    render_template "$f" >"$dest/$out" || return 1
  done < <(select_manifests "$src" "$variant")
}

manifest_variant() {
  if [[ -n "${SPOTFORGE_DOMAIN:-}" ]]; then echo domain; else echo ip; fi
}

# A moving tag would let two nodes run different Forgejo versions against one database.
validate_image() {
  local image="$1" last
  [[ "$image" == *@sha256:* ]] && return 0
  last="${image##*/}"
  [[ "$last" == *:* && "${last##*:}" != latest && -n "${last##*:}" ]]
}

imds_get() {
  local base="${SPOTFORGE_IMDS_URL:-http://169.254.169.254}" token
  token="$(curl -fsS --max-time 5 -X PUT "$base/latest/api/token" \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')" || return 1
  curl -fsS --max-time 5 -H "X-aws-ec2-metadata-token: $token" "$base/latest/meta-data/$1"
}

node_region() {
  if [[ -z "${SPOTFORGE_REGION:-}" ]]; then
    SPOTFORGE_REGION="$(retry 10 3 imds_get placement/region)" || return 1
  fi
  printf '%s\n' "$SPOTFORGE_REGION"
}

# The agent records the phase locally (its `status` reports it) and on the spotforge:phase tag.
tag_phase() {
  local phase="$1"
  retry 10 3 "$SPOTFORGE_HOME/bin/spotforge-agent" set-phase "$phase" || return 1
  log "phase $phase reported"
}
