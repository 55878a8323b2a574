using System.CommandLine;

namespace Distributed.Cli.Commands;

/// <summary>`dsattn run`.</summary>
internal static class RunCommand
{
    public static Command Create()
    {
        var command = new Command("run", "Not implemented yet.");
        command.SetAction(_ => { Console.Error.WriteLine("dsattn run: not implemented yet."); return 2; });
        return command;
    }
}
