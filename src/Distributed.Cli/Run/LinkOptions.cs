using System.CommandLine;
using Distributed.Cluster;

namespace Distributed.Cli.Run;

/// <summary>
/// The overlap options of <c>dsattn run</c>: <c>--link-bandwidth GB_PER_S [--link-latency US]</c> (an emulated
/// slower network, see <see cref="EmulatedLinkCommunicator"/>) and <c>--no-overlap</c> (the blocking path).
/// </summary>
internal sealed class LinkOptions
{
    private readonly Option<double?> _bandwidth = new("--link-bandwidth")
    {
        Description = "Emulate a slower network: every collective takes at least --link-latency + received bytes / this bandwidth on each rank (GB/s, 10^9 bytes per second), in-process and under MPI. The summary then reports the communication time hidden behind compute.",
    };

    private readonly Option<double> _latency = new("--link-latency")
    {
        Description = "With --link-bandwidth: latency added once per collective, in microseconds.",
        DefaultValueFactory = _ => 0,
    };

    private readonly Option<bool> _noOverlap = new("--no-overlap")
    {
        Description = "Do not hide communication behind compute (LASP-2 waits for its state all-gather before the intra-chunk work; the ring waits for each K/V block and dK/dV accumulator where it is sent); same results, for comparison and debugging.",
    };

    /// <summary>Adds the options to <paramref name="command"/>.</summary>
    public static LinkOptions AddTo(Command command)
    {
        var o = new LinkOptions();
        command.Options.Add(o._bandwidth);
        command.Options.Add(o._latency);
        command.Options.Add(o._noOverlap);
        return o;
    }

    /// <summary>The settings with the parsed link and overlap, or an error message naming the option.</summary>
    public (RunSettings? Settings, string? Error) Apply(ParseResult parse, RunSettings settings)
    {
        double? gbps = parse.GetValue(_bandwidth);
        double latency = parse.GetValue(_latency);
        if (gbps is null && parse.GetResult(_latency) is { Implicit: false })
            return (null, "--link-latency needs --link-bandwidth (e.g. --link-bandwidth 10 --link-latency 5).");
        EmulatedLink? link = null;
        if (gbps is not null)
        {
            try { link = EmulatedLink.FromGigabytesPerSecond(gbps.Value, latency); }
            catch (ArgumentOutOfRangeException e) { return (null, e.Message.Split(" (Parameter", 2)[0]); }
        }
        return (settings with { Link = link, Overlap = !parse.GetValue(_noOverlap) }, null);
    }
}
