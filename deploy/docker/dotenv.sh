# Sourced by the stack's scripts (bash): .env as compose reads it.
#
#   load_dotenv          export each KEY=VALUE of .env whose KEY the environment does not set
#                        (compose's order: the shell's value wins over the file's), so the
#                        scripts see what compose sees (SECRETS_DIR, COMPOSE_PROJECT_NAME,
#                        COMPOSE_FILES, REDIS_PORT, ...)
#   dotenv_value KEY     print .env's value of KEY (nothing when it has none), exporting nothing
#   set_dotenv KEY VALUE make .env's KEY line say VALUE (appended when there is none)
#
# Lines are KEY=VALUE; blank lines and # comments are skipped, one pair of surrounding quotes
# is removed, and so is a " # comment" after an unquoted value.

load_dotenv() {
    [ -f .env ] || return 0
    local line key value
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        [[ "$line" =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
        key=${BASH_REMATCH[2]}
        value=${BASH_REMATCH[3]}
        if [[ "$value" =~ ^\"(.*)\"[[:space:]]*$ || "$value" =~ ^\'(.*)\'[[:space:]]*$ ]]; then
            value=${BASH_REMATCH[1]}
        else
            value=$(sed -E 's/[[:space:]]+#.*$//; s/[[:space:]]+$//' <<<"$value")
        fi
        [ -n "${!key+x}" ] || export "$key=$value"
    done <.env
}

dotenv_value() {
    (
        unset "$1"
        load_dotenv
        printf '%s' "${!1-}"
    )
}

set_dotenv() {
    local key=$1 value=$2
    touch .env
    if grep -q "^$key=" .env; then
        local tmp
        tmp=$(mktemp .env.XXXXXX)
        awk -v k="$key" -v v="$value" 'index($0, k "=") == 1 { print k "=" v; next } { print }' \
            .env >"$tmp"
        chmod --reference=.env "$tmp"
        mv "$tmp" .env
    else
        printf '%s=%s\n' "$key" "$value" >>.env
    fi
}
