/* The fake llama-server as a real executable named llama-server: it embeds Python and runs
   fake_llama_server.py (FAKE_SCRIPT, set when it is compiled) with its own arguments. llamactl recognises
   its instances by the executable's name, so a shell wrapper around `python fake.py` would not pass. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    char **args = malloc(sizeof(char *) * (size_t)(argc + 2));
    if (args == NULL) return 71;
    args[0] = argv[0];
    args[1] = FAKE_SCRIPT;
    for (int i = 1; i < argc; i++) args[i + 1] = argv[i];
    args[argc + 1] = NULL;
    return Py_BytesMain(argc + 1, args);
}
