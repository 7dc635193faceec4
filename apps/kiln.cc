// kiln: the command line of a kiln cluster (`kiln help` lists the commands). The commands live in
// cli/ (kiln_cli); this file only hands them argv.
#include "cli/commands.h"

int main(int argc, char** argv) { return kiln::cli::Main(argc, argv); }
