using System.CommandLine;
using System.Globalization;
using System.Text;
using Distributed.Cluster.ControlPlane;
using Distributed.Cluster.ControlPlane.Protocol;
using Grpc.Core;

namespace Distributed.Cli.Commands;

/// <summary>
/// <c>dsattn status --coordinator HOST:PORT</c>: a read-only table of every rank of a running job
/// (phase, progress, last collective and for how long, heartbeat age), from the job's coordinator.
/// </summary>
internal static class StatusCommand
{
    public static Command Create()
    {
        var coordinator = new Option<string>("--coordinator") { Description = "HOST:PORT of the job's coordinator (printed by rank 0 as 'control plane: coordinator at ...').", Required = true };
        var tokenFile = new Option<string?>("--token-file") { Description = "File holding the job token. Default: the file rank 0 wrote for that port (/tmp/dsattn-coordinator-PORT.token)." };
        var watch = new Option<bool>("--watch") { Description = "Redraw every second until the job ends (Ctrl-C to stop)." };
        var command = new Command("status", "Show where every rank of a running MPI job is: phase, progress, last collective and for how long, heartbeat age (read-only).")
        {
            coordinator, tokenFile, watch,
        };
        command.SetAction(parse => Execute(parse.GetValue(coordinator)!, parse.GetValue(tokenFile), parse.GetValue(watch), Console.Out));
        return command;
    }

    internal static int Execute(string address, string? tokenFile, bool watch, TextWriter output)
    {
        int colon = address.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(address[(colon + 1)..], NumberStyles.None, CultureInfo.InvariantCulture, out int port))
        {
            Console.Error.WriteLine($"dsattn status: --coordinator must be HOST:PORT (got '{address}').");
            return 2;
        }
        tokenFile ??= JobControlPlane.TokenFilePath(port);
        string token;
        try
        {
            token = File.ReadAllText(tokenFile).Trim();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Console.Error.WriteLine($"dsattn status: cannot read the token file {tokenFile} ({e.Message}); give --token-file.");
            return 2;
        }
        using var client = new CoordinatorClient(address, token);
        bool first = true;
        while (true)
        {
            StatusReply reply;
            try
            {
                reply = client.GetStatus(TimeSpan.FromSeconds(5));
            }
            catch (RpcException e)
            {
                if (watch && !first) { output.WriteLine("the coordinator is gone: the job has ended."); return 0; }
                Console.Error.WriteLine($"dsattn status: {address}: {e.StatusCode}: {e.Status.Detail}");
                return 1;
            }
            if (watch && !first && !Console.IsOutputRedirected) output.Write("\x1b[H\x1b[2J");
            output.Write(Format(reply, address));
            first = false;
            if (!watch) return 0;
            Thread.Sleep(1000);
        }
    }

    /// <summary>The table, at most 80 columns wide.</summary>
    internal static string Format(StatusReply reply, string address)
    {
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture, $"job at {address}: {reply.Size} rank(s)").AppendLine();
        sb.AppendLine("rank  phase                 done  last collective          for           beat");
        foreach (var r in reply.Ranks)
        {
            string phase = r.Phase.Length > 20 ? r.Phase[..20] : r.Phase;
            string done = r.Progress < 0 ? "" : (100 * r.Progress).ToString("0", CultureInfo.InvariantCulture) + "%";
            var c = r.Last;
            string coll = c is null || c.Sequence == 0 ? "none yet" : $"{c.Op} #{c.Sequence} {Watchdog.Bytes(c.Bytes)}";
            if (coll.Length > 24) coll = coll[..24];
            string when = c is null || c.Sequence == 0 ? "" : c.LeftUnixMs == 0
                ? $"in {Watchdog.Sec(reply.NowUnixMs - c.EnteredUnixMs)} s"
                : $"left {Watchdog.Sec(reply.NowUnixMs - c.LeftUnixMs)} s";
            string beat = r.HeartbeatAgeMs < 0 ? "never" : $"{Watchdog.Sec(r.HeartbeatAgeMs)} s";
            sb.Append(CultureInfo.InvariantCulture, $"{r.Rank,4}  {phase,-20} {done,5}  {coll,-24} {when,-13} {beat,7}").AppendLine();
        }
        if (reply.Verdict.Length > 0) sb.AppendLine(reply.Verdict);
        return sb.ToString();
    }
}
