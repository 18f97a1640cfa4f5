# Sparkla's Bash kernel. Started by sparkla-agent as `bash --norc --noprofile -c <this script>`.
# Requests arrive on fd 3, one per line: the code with every backslash doubled and every
# newline written as \n, so that `printf %b` restores it exactly. The kernel answers on fd 4
# with {"t":"done","status":N} after each request; stdout and stderr go to the agent through
# the process's own pipes.
#
# Cancellation: SIGINT interrupts the running command; the INT trap then sets a DEBUG trap
# that skips every remaining command of the chunk (extdebug makes a DEBUG trap returning 1
# skip the command), so the chunk stops and the shell keeps its state.
shopt -s extdebug
__sparkla_skip() { trap '[[ $BASH_COMMAND == *__sparkla_* || $BASH_COMMAND == "trap - DEBUG" ]]' DEBUG; }
__sparkla_reset() { trap - DEBUG; }
__sparkla_running=0
trap '__sparkla_int=1; (( __sparkla_running )) && __sparkla_skip' INT
printf '{"t":"ready"}\n' >&4
while true; do
  IFS= read -r __sparkla_line <&3
  __sparkla_status=$?
  if (( __sparkla_status > 128 )); then continue; fi
  if (( __sparkla_status != 0 )); then exit 0; fi
  printf -v __sparkla_code '%b' "$__sparkla_line"
  __sparkla_int=0
  __sparkla_running=1
  eval "$__sparkla_code" 3<&- 4>&-
  __sparkla_status=$?
  __sparkla_running=0
  __sparkla_reset
  __sparkla_cancelled=false
  (( __sparkla_int )) && __sparkla_cancelled=true
  printf '{"t":"done","status":%d,"cancelled":%s}\n' "$__sparkla_status" "$__sparkla_cancelled" >&4
done
