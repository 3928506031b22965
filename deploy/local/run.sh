#!/usr/bin/env bash
# Run the simulator and one process per agent on this machine, over mutual TLS with per-agent
# tokens: the deployment, every party its own process. Usage:
#   deploy/local/run.sh CHECKPOINT [ROUNDS] [-- extra `fedcomm sim serve` options]
# CHECKPOINT is a team.pt (or run directory) whose environment the simulator serves.
set -euo pipefail
checkpoint=${1:?usage: run.sh CHECKPOINT [ROUNDS]}
rounds=${2:-3}
shift $(( $# < 2 ? $# : 2 )); [ "${1:-}" = "--" ] && shift
work=${FEDCOMM_DEPLOY_DIR:-$(mktemp -d)}
read -r env opts agents < <(python - "$checkpoint" <<'PY'
import sys
from fedcomm.runs import load_team
team = load_team(sys.argv[1])
spec = team.spec
counts = {"factory": ("n_sensors", "n_processors", "n_actuators"), "platoon": ("n_trucks", "n_cars")}
names = counts.get(spec.name, ())
opts = ",".join(f"{n}={t.count}" for n, t in zip(names, spec.types))
print(spec.name, opts or "-", ",".join(spec.agent_ids))
PY
)
IFS=, read -r -a agent_list <<< "$agents"
env_opts=()
[ "$opts" != "-" ] && for o in ${opts//,/ }; do env_opts+=(--env-opt "$o"); done
"$(dirname "$0")/gen_certs.sh" "$work/certs" localhost "${agent_list[@]}"
fedcomm sim tokens --env "$env" "${env_opts[@]}" --out "$work/tokens.json"
fedcomm sim serve --env "$env" "${env_opts[@]}" --port 0 --port-file "$work/port" \
  --tokens "$work/tokens.json" --tls-cert "$work/certs/sim.crt" --tls-key "$work/certs/sim.key" \
  --tls-client-ca "$work/certs/ca.crt" "$@" &
sim=$!
trap 'kill $sim 2>/dev/null' EXIT
while [ ! -s "$work/port" ]; do kill -0 $sim || exit 1; sleep 0.2; done
pids=()
for agent in "${agent_list[@]}"; do
  OMP_NUM_THREADS=1 fedcomm agent --sim "localhost:$(cat "$work/port")" --agent-id "$agent" \
    --tokens "$work/tokens.json" --checkpoint "$checkpoint" --rounds "$rounds" \
    --tls-ca "$work/certs/ca.crt" --tls-cert "$work/certs/$agent.crt" \
    --tls-key "$work/certs/$agent.key" --save "$work/$agent.pt" \
    --ledger "$work/$agent.ledger.jsonl" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "agents finished (status $status); models and certificates in $work"
exit $status
