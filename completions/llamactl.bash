# llamactl's bash completion (completions/README.md says where it goes). llamactl answers KIND<TAB>VALUE
# lines: plain values are offered as they are, file and dir complete paths starting with VALUE.
_llamactl_completion() {
    local IFS=$'\n' line kind value
    COMPREPLY=()
    for line in $(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD="$COMP_CWORD" \
                      _LLAMACTL_COMPLETE=complete_bash "$1" 2>/dev/null); do
        IFS=$'\t' read -r kind value _ <<<"$line"
        case $kind in
            plain) COMPREPLY+=("$value") ;;
            file) compopt -o filenames 2>/dev/null; COMPREPLY+=($(compgen -f -- "$value")) ;;
            dir) compopt -o filenames 2>/dev/null; COMPREPLY+=($(compgen -d -- "$value")) ;;
        esac
    done
    return 0
}

complete -F _llamactl_completion llamactl
