#!/bin/sh
# Redis ACL users of the stack, one per role, written from the role password files:
#
#   deploy/redis/acl.sh SECRETS_DIR [NAMESPACE] > users.acl
#
# SECRETS_DIR holds redis-producer, redis-trainer, redis-exporter, redis-autoscaler and
# redis-admin, one password each (deploy/docker/make-env.sh writes them). Passwords are
# stored hashed (#<sha256>), so the file can never carry a password, nor a config line a
# password smuggled in. The `default` user is off (see below). The redis container runs this
# at every start (docker-compose.yml), and tests/test_acl.py checks each role against a real
# redis-server 7 running its output. Never commit the output.
#
# Each role holds exactly the commands its code runs today, on keys under NAMESPACE:
# (see docs/operations.md, "Security", for the table).
#   producer    writes the contract (SET NX: ACLs cannot tell SET NX from SET; the
#               fingerprint check catches a changed contract), its lease and id counter,
#               the training stream (XADD, through the reservation script), the validation
#               set; reads the stage. No XREADGROUP, XACK, XDEL: it never consumes.
#   trainer     reads the contract, validation set and bounds; consumes the training
#               stream (a selector: group commands only, never XADD); writes only the
#               dead-letter stream, its failures hash and the stage key.
#   exporter    reads the streams and INFO; writes nothing.
#   autoscaler  XLEN of the training stream; nothing else.
#   admin       everything (operators: redis-cli --user admin --askpass).
# KEYS and SCAN ignore key patterns, so only admin has them.
set -eu
LC_ALL=C  # byte ranges in the password check below
export LC_ALL

dir=${1:?usage: acl.sh SECRETS_DIR [NAMESPACE]}
ns=${2:-maskstream}
case $ns in
    *[!A-Za-z0-9_.-]* | "") echo "acl.sh: namespace '$ns': letters, digits, _ . - only" >&2; exit 2 ;;
esac

# The hash of a role's password, after the checks every service makes too
# (shared/settings.py, RunSettings): long enough, no placeholder, no character that could
# start a new config or ACL rule (whitespace, #, <, >, quotes, ...): the same set as
# shared/settings.py's password_problem, so a password the services take loads here too.
hash_of() {
    file=$dir/redis-$1
    if [ ! -r "$file" ]; then
        echo "acl.sh: $file is missing or unreadable: run deploy/docker/make-env.sh" >&2
        exit 2
    fi
    # Surrounding whitespace dropped (a CRLF or a trailing space), as the services do.
    password=$(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$file")
    case $password in
        change-me | changeme | password | admin | redis | secret)
            echo "acl.sh: $file holds the placeholder '$password': run deploy/docker/make-env.sh" >&2
            exit 2 ;;
        *[!!-~]* | *[\#\<\>\"\'\`\\]*)
            echo "acl.sh: $file: printable ASCII only, without whitespace or # < > \" ' \` \\" >&2
            exit 2 ;;
    esac
    if [ ${#password} -lt 16 ]; then
        echo "acl.sh: $file: at least 16 characters (it has ${#password})" >&2
        exit 2
    fi
    printf '%s' "$password" | sha256sum | cut -d' ' -f1
}

# Redis 7.2+ clients announce themselves (redis-py sends CLIENT SETINFO on every connect and
# ignores a refusal, which would still fill ACL LOG): allow it there. 7.0 knows no such
# subcommand, and an ACL file naming it would not load. REDIS_VERSION overrides the check.
version=${REDIS_VERSION:-$(redis-server --version 2>/dev/null | sed -n 's/.*v=\([0-9]*\.[0-9]*\).*/\1/p')}
setinfo=""
case $version in
    7.[2-9]* | 7.[1-9][0-9]* | [8-9].* | [1-9][0-9]*.*) setinfo="+client|setinfo" ;;
esac

producer=$(hash_of producer)
trainer=$(hash_of trainer)
exporter=$(hash_of exporter)
autoscaler=$(hash_of autoscaler)
admin=$(hash_of admin)
k=$ns

# `default` is off: no connection can act as it, with or without a password. It still holds
# every permission because Redis replays the append-only file as a client with `default`'s
# permissions and EXEC re-checks them (Redis 7.0): a `default` allowed nothing drops every
# MULTI/EXEC of the AOF on reload, silently (each producer send is one).
cat <<ACL
user default off resetpass allcommands allkeys allchannels
user producer on #$producer resetchannels -@all $setinfo +ping +multi +exec +discard +watch +unwatch +evalsha +eval +script|load +script|exists +time +get +set +incrby +del +pexpire +xadd +xlen +hget +hset +hdel +hgetall ~$k:meta ~$k:train ~$k:val ~$k:val:done ~$k:val:lock ~$k:train:max_backlog ~$k:train:produced ~$k:train:reserved ~$k:producer:* %R~$k:stage
user trainer on #$trainer resetchannels -@all $setinfo +ping +get +set +xrange +xadd +hincrby +hmget +hdel %R~$k:meta %R~$k:val %R~$k:val:done %R~$k:train:max_backlog ~$k:stage ~$k:dead ~$k:train:failures:* (~$k:train -@all +xreadgroup +xack +xdel +xautoclaim +xclaim +xpending +xinfo|consumers +xgroup|create +xgroup|delconsumer +xlen)
user exporter on #$exporter resetchannels -@all $setinfo +ping +select +client|setname +info +config|get +slowlog|get +slowlog|len +latency|latest +latency|histogram +client|list +dbsize +type +xinfo +xlen +strlen +hlen %R~$k:*
user autoscaler on #$autoscaler resetchannels -@all $setinfo +ping +xlen %R~$k:train
user admin on #$admin ~* &* +@all
ACL
