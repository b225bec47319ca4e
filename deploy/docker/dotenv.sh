# Sourced by the stack's scripts (bash): the few values of .env they need themselves, read
# as compose reads them. Nothing is exported: compose reads .env on its own.
#
#   dotenv_value KEY     print .env's value of KEY (nothing when it has none): the last
#                        KEY=VALUE line wins; blank lines and # comments are skipped, one pair
#                        of surrounding quotes is removed, and so is a " # comment" after the
#                        value. ${VAR} references are not expanded.
#   setting KEY DEFAULT  the shell's KEY when set and not empty, else .env's, else DEFAULT
#                        (compose's order)
#   set_dotenv KEY VALUE make .env's KEY line say VALUE (appended when there is none)
#   with_trainer PROFILE PROFILES   PROFILES (comma-separated) with PROFILE (cpu or gpu) as
#                        the trainer's, the other trainer's taken out, any other kept

_DOTENV_LINE='^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$'

dotenv_value() {
    [ -f .env ] || return 0
    local line value found=
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        [[ "$line" =~ $_DOTENV_LINE ]] && [ "${BASH_REMATCH[2]}" = "$1" ] || continue
        value=${BASH_REMATCH[3]}
        if [[ "$value" =~ ^\"([^\"]*)\"([[:space:]]+#.*)?[[:space:]]*$ ||
            "$value" =~ ^\'([^\']*)\'([[:space:]]+#.*)?[[:space:]]*$ ]]; then
            value=${BASH_REMATCH[1]}
        else
            value=$(sed -E 's/(^|[[:space:]]+)#.*$//; s/^[[:space:]]+//; s/[[:space:]]+$//' \
                <<<"$value")
        fi
        found=$value
    done <.env
    printf '%s' "$found"
}

setting() {
    local value=${!1-}
    [ -n "$value" ] || value=$(dotenv_value "$1")
    printf '%s' "${value:-$2}"
}

set_dotenv() {
    local key=$1 value=$2 tmp
    touch .env
    tmp=$(mktemp .env.tmp.XXXXXX)
    # ENVIRON, not -v: awk would read backslashes in the value as escapes.
    K=$key V=$value awk '
        BEGIN { k = ENVIRON["K"]; v = ENVIRON["V"] }
        $0 ~ "^[[:space:]]*(export[[:space:]]+)?" k "=" { if (!done) print k "=" v; done = 1; next }
        { print }
        END { if (!done) print k "=" v }
    ' .env >"$tmp" || { rm -f "$tmp"; return 1; }
    chmod --reference=.env "$tmp"
    mv "$tmp" .env
}

with_trainer() {
    local others
    others=$(tr ',' '\n' <<<"$2" | { grep -vx -e cpu -e gpu -e '' || true; } | paste -sd, -)
    printf '%s' "$1${others:+,$others}"
}
