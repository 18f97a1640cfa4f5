# Sparkla's Bash kernel: `bash --norc --noprofile -s` reading its script from a pipe (its
# stdin). The agent first writes this preamble, then one line per request:
#
#   __sparkla_code=$'<code>'; __sparkla_begin; eval "$__sparkla_code" </dev/null 4>&-; __sparkla_end $?
#
# so the code runs at the top level of the shell (variables, functions, `declare`s and the
# working directory persist), with /dev/null as its stdin and fd 4 hidden. `__sparkla_end`
# answers on fd 4 with {"t":"done","status":N,"cancelled":B}; stdout and stderr reach the
# agent through the process's own pipes.
#
# Cancellation: SIGINT interrupts the running command (its children get it too). The INT
# trap then arms a DEBUG trap which, for every further command of the request, breaks out
# of all loops and skips the command (with extdebug, a DEBUG trap that fails skips the
# command), so the request stops promptly and the shell keeps its state. Our own commands
# all carry `__sparkla_` and are never skipped.
exec 3<&-
shopt -s extdebug
__sparkla_skip() {
  trap '[[ $BASH_COMMAND == *__sparkla_* || $BASH_COMMAND == "trap - DEBUG" ]] || { break 1000 2>/dev/null; false; }' DEBUG
}
__sparkla_begin() { __sparkla_int=0; __sparkla_running=1; }
__sparkla_end() {
  trap - DEBUG
  __sparkla_running=0
  __sparkla_cancelled=false
  (( __sparkla_int )) && __sparkla_cancelled=true
  printf '{"t":"done","status":%d,"cancelled":%s}\n' "$1" "$__sparkla_cancelled" >&4
}
__sparkla_running=0
__sparkla_int=0
trap '__sparkla_int=1; (( __sparkla_running )) && __sparkla_skip' INT
printf '{"t":"ready"}\n' >&4
