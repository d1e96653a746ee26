# llamactl's fish completion: ~/.config/fish/completions/llamactl.fish (completions/README.md).
# llamactl answers KIND<TAB>VALUE<TAB>HELP lines: plain values are offered with their help, file and dir
# complete paths.
function _llamactl_completion
    env _TYPER_COMPLETE_ARGS=(commandline -cp) _LLAMACTL_COMPLETE=complete_fish llamactl 2>/dev/null |
    while read -l --delimiter \t kind value help
        switch $kind
            case plain
                printf '%s\t%s\n' $value "$help"
            case file
                __fish_complete_path $value
            case dir
                __fish_complete_directories $value
        end
    end
end

complete --command llamactl --no-files --arguments '(_llamactl_completion)'
