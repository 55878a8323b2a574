using System.CommandLine;

namespace Distributed.Cli.Commands;

/// <summary>`dsattn bench`.</summary>
internal static class BenchCommand
{
    public static Command Create()
    {
        var command = new Command("bench", "Not implemented yet.");
        command.SetAction(_ => { Console.Error.WriteLine("dsattn bench: not implemented yet."); return 2; });
        return command;
    }
}
