using System.CommandLine;

namespace Distributed.Cli.Commands;

/// <summary>`dsattn ptx`.</summary>
internal static class PtxCommand
{
    public static Command Create()
    {
        var command = new Command("ptx", "Not implemented yet.");
        command.SetAction(_ => { Console.Error.WriteLine("dsattn ptx: not implemented yet."); return 2; });
        return command;
    }
}
