using System.Globalization;
using System.Text;
using Distributed.Cluster.ControlPlane.Protocol;

namespace Distributed.Cluster.ControlPlane;

/// <summary>The latest registration and heartbeat of every rank, as the coordinator keeps them.</summary>
internal sealed class CoordinatorState(int size)
{
    private readonly object _lock = new();
    private readonly RankStatus?[] _ranks = new RankStatus?[size];
    private readonly long[] _seenMs = new long[size];

    public int Size { get; } = size;

    public string Verdict { get; set; } = "";

    public void Register(RegisterRequest r, long nowMs)
    {
        Check(r.Rank);
        lock (_lock)
        {
            var s = _ranks[r.Rank] ?? new RankStatus { Rank = r.Rank, Phase = "registered", Progress = -1, Last = new Collective() };
            s.Registered = true;
            s.Host = r.Host;
            s.Pid = r.Pid;
            _ranks[r.Rank] = s;
            _seenMs[r.Rank] = nowMs;
        }
    }

    public void Heartbeat(HeartbeatRequest h, long nowMs)
    {
        Check(h.Rank);
        lock (_lock)
        {
            var s = _ranks[h.Rank] ?? new RankStatus { Rank = h.Rank, Registered = false };
            s.Phase = h.Phase;
            s.Progress = h.Progress;
            s.Last = h.Last ?? new Collective();
            _ranks[h.Rank] = s;
            _seenMs[h.Rank] = nowMs;
        }
    }

    public StatusReply Snapshot(long nowMs)
    {
        var reply = new StatusReply { Size = Size, NowUnixMs = nowMs, Verdict = Verdict };
        lock (_lock)
        {
            for (int r = 0; r < Size; r++)
            {
                var s = _ranks[r]?.Clone() ?? new RankStatus { Rank = r, Phase = "not registered", Progress = -1, Last = new Collective(), HeartbeatAgeMs = -1 };
                if (_ranks[r] is not null) s.HeartbeatAgeMs = nowMs - _seenMs[r];
                reply.Ranks.Add(s);
            }
        }
        return reply;
    }

    private void Check(int rank)
    {
        if (rank < 0 || rank >= Size)
            throw new Grpc.Core.RpcException(new Grpc.Core.Status(Grpc.Core.StatusCode.InvalidArgument, $"rank {rank} is not in [0, {Size})"));
    }
}

/// <summary>
/// Decides from a status snapshot whether the job hangs, and names the culprit. Two rules: a rank that
/// registered and has not said it is done sent no heartbeat for longer than the silence timeout; or some
/// ranks have waited inside collective number s for longer than the hang timeout while another rank
/// never entered s (that rank is the culprit). When every rank waits inside a collective for longer than
/// the hang timeout, the rank with the lowest collective number is named.
/// </summary>
internal static class Watchdog
{
    public static string? Check(StatusReply st, TimeSpan hangTimeout, TimeSpan silenceTimeout)
    {
        long now = st.NowUnixMs;
        var ranks = st.Ranks;
        foreach (var r in ranks)
            if (r.Registered && r.Phase != "done" && r.HeartbeatAgeMs > silenceTimeout.TotalMilliseconds)
                return Report(st, r.Rank, $"rank {r.Rank} sent no heartbeat for {Sec(r.HeartbeatAgeMs)} s (timeout {Sec((long)silenceTimeout.TotalMilliseconds)} s); its last operation: {Op(r.Last, now)}.");

        var waiting = ranks.Where(r => Inside(r) && now - r.Last.EnteredUnixMs > hangTimeout.TotalMilliseconds).ToList();
        if (waiting.Count == 0) return null;
        long s = waiting.Min(r => r.Last.Sequence);
        var behind = ranks.Where(r => r.Last.Sequence < s && r.Phase != "done").ToList();
        var inS = waiting.Where(r => r.Last.Sequence == s).ToList();
        string what = $"{inS[0].Last.Op} #{s}";
        if (behind.Count > 0)
        {
            var c = behind[0];
            return Report(st, c.Rank, $"rank {c.Rank} never entered collective {what}: rank{(inS.Count > 1 ? "s" : "")} {string.Join(", ", inS.Select(r => r.Rank))} waited inside it for {Sec(now - inS.Min(r => r.Last.EnteredUnixMs))} s (--hang-timeout {hangTimeout.TotalSeconds:0.#} s); rank {c.Rank}'s last operation: {Op(c.Last, now)}.");
        }
        if (ranks.All(r => Inside(r) || r.Phase == "done"))
        {
            var c = ranks.Where(Inside).OrderBy(r => r.Last.Sequence).ThenBy(r => r.Rank).First();
            return Report(st, c.Rank, $"every rank waits inside a collective for longer than --hang-timeout {hangTimeout.TotalSeconds:0.#} s, and they do not match: rank {c.Rank} is the furthest behind, in {Op(c.Last, now)}.");
        }
        return null;
    }

    private static bool Inside(RankStatus r) => r.Last is { Sequence: > 0, LeftUnixMs: 0 };

    private static string Report(StatusReply st, int culprit, string headline)
    {
        var sb = new StringBuilder();
        sb.Append("dsattn watchdog: ").AppendLine(headline);
        foreach (var r in st.Ranks)
        {
            string hb = r.HeartbeatAgeMs < 0 ? "never registered" : $"heartbeat {Sec(r.HeartbeatAgeMs)} s ago";
            sb.Append(CultureInfo.InvariantCulture, $"  rank {r.Rank}: {Op(r.Last, st.NowUnixMs)}, phase {r.Phase}, {hb}{(r.Rank == culprit ? "  <- culprit" : "")}").AppendLine();
        }
        sb.Append("dsattn watchdog: ending the job.");
        return sb.ToString();
    }

    /// <summary>"AllGather #3 (1.0 MiB), inside for 12.0 s" or "... left 2.0 s ago".</summary>
    public static string Op(Collective? c, long now)
    {
        if (c is null || c.Sequence == 0) return "no collective yet";
        string where = c.LeftUnixMs == 0 ? $"inside for {Sec(now - c.EnteredUnixMs)} s" : $"left {Sec(now - c.LeftUnixMs)} s ago";
        return $"{c.Op} #{c.Sequence} ({Bytes(c.Bytes)}), {where}";
    }

    public static string Sec(long ms) => (ms / 1000.0).ToString("0.0", CultureInfo.InvariantCulture);

    public static string Bytes(long b) => b switch
    {
        < 1024 => $"{b} B",
        < 1 << 20 => (b / 1024.0).ToString("0.0", CultureInfo.InvariantCulture) + " KiB",
        < 1 << 30 => (b / 1048576.0).ToString("0.0", CultureInfo.InvariantCulture) + " MiB",
        _ => (b / 1073741824.0).ToString("0.0", CultureInfo.InvariantCulture) + " GiB",
    };
}
