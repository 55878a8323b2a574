using System.CommandLine;
using Distributed.Cli.Commands;
using Distributed.Cluster;

// An MPI rank sharing its host restarts inside its share of the cores (DSATTN_BIND=off keeps it as started).
RankAffinity.RestartPinned();

var root = new RootCommand("dsattn: sequence-parallel attention (LASP-2, all-gather KV, partial softmax states, ring, Ulysses, hybrid) over MPI or in-process ranks.");
root.Subcommands.Add(RunCommand.Create());
root.Subcommands.Add(LaunchCommand.Create());
root.Subcommands.Add(StatusCommand.Create());
root.Subcommands.Add(PtxCommand.Create());
root.Subcommands.Add(BenchCommand.Create());
root.Subcommands.Add(TrainCommand.Create());
root.Subcommands.Add(SimulateCommand.Create());
return await root.Parse(args).InvokeAsync().ConfigureAwait(false);
