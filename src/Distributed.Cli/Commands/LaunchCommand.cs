using System.CommandLine;

namespace Distributed.Cli.Commands;

/// <summary>`dsattn launch`.</summary>
internal static class LaunchCommand
{
    public static Command Create()
    {
        var command = new Command("launch", "Not implemented yet.");
        command.SetAction(_ => { Console.Error.WriteLine("dsattn launch: not implemented yet."); return 2; });
        return command;
    }
}
