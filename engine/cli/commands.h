// The subcommands of the `needle` binary; each returns the process exit code.
#pragma once

namespace needle {
int CmdGenerate(int argc, char** argv);
int CmdInfo(int argc, char** argv);
int CmdTokenize(int argc, char** argv);
int CmdEval(int argc, char** argv);
int CmdData(int argc, char** argv);
int CmdServe(int argc, char** argv);
int CmdAsk(int argc, char** argv);
}  // namespace needle
