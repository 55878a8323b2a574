using Distributed.Cluster.ControlPlane.Protocol;
using Grpc.Core;
using Grpc.Net.Client;

namespace Distributed.Cluster.ControlPlane;

/// <summary>What this rank is doing, for its heartbeats: set by the program, read by <see cref="RankReporter"/>.</summary>
public static class RankActivity
{
    private static volatile string s_phase = "starting";
    private static double s_progress = -1;

    /// <summary>Phase name (forward, backward, check, ...).</summary>
    public static string Phase => s_phase;

    /// <summary>Fraction of the phase done, 0..1, or -1 when unknown.</summary>
    public static double Progress => Volatile.Read(ref s_progress);

    /// <summary>Sets the phase and its progress.</summary>
    /// <param name="phase">Phase name.</param>
    /// <param name="progress">Fraction done, 0..1, or -1 when unknown.</param>
    public static void Set(string phase, double progress = -1)
    {
        s_phase = phase;
        Volatile.Write(ref s_progress, progress);
    }

    /// <summary>Sets the progress of the current phase.</summary>
    /// <param name="progress">Fraction done, 0..1.</param>
    public static void SetProgress(double progress) => Volatile.Write(ref s_progress, progress);
}

/// <summary>A gRPC client of the coordinator (h2c), with the job token on every call.</summary>
public sealed class CoordinatorClient : IDisposable
{
    private readonly GrpcChannel _channel;
    private readonly Protocol.Coordinator.CoordinatorClient _client;
    private readonly Metadata _headers;

    /// <summary>Connects (lazily) to <paramref name="address"/> (host:port).</summary>
    /// <param name="address">host:port of the coordinator.</param>
    /// <param name="token">The job token, or null to send none.</param>
    public CoordinatorClient(string address, string? token)
    {
        ArgumentException.ThrowIfNullOrEmpty(address);
        _channel = GrpcChannel.ForAddress($"http://{address}", new GrpcChannelOptions
        {
            HttpHandler = new SocketsHttpHandler { ConnectTimeout = TimeSpan.FromSeconds(2), EnableMultipleHttp2Connections = false },
        });
        _client = new Protocol.Coordinator.CoordinatorClient(_channel);
        _headers = token is null ? [] : new Metadata { { Coordinator.TokenHeader, token } };
    }

    internal RegisterReply Register(RegisterRequest request, TimeSpan timeout) =>
        _client.Register(request, _headers, DateTime.UtcNow + timeout);

    internal void Heartbeat(HeartbeatRequest request, TimeSpan timeout) =>
        _client.Heartbeat(request, _headers, DateTime.UtcNow + timeout);

    internal StatusReply GetStatus(TimeSpan timeout) =>
        _client.GetStatus(new StatusRequest(), _headers, DateTime.UtcNow + timeout);

    /// <summary>Closes the connection.</summary>
    public void Dispose() => _channel.Dispose();
}

/// <summary>
/// A rank's side of the control plane: registers with the coordinator, then sends a heartbeat about once
/// a second from a background thread (phase and progress from <see cref="RankActivity"/>, the last
/// collective from <see cref="CollectiveProbe"/>). When the coordinator cannot be reached it warns once
/// that hang detection is off and the job goes on. Disposing sends a last heartbeat with phase done.
/// </summary>
public sealed class RankReporter : IDisposable
{
    private static readonly TimeSpan Interval = TimeSpan.FromSeconds(1);
    private readonly CoordinatorClient _client;
    private readonly int _rank;
    private readonly TextWriter _warn;
    private readonly string _address;
    private readonly ManualResetEventSlim _stop = new();
    private readonly Thread _thread;
    private bool _warned;
    private int _failures;

    private RankReporter(string address, string token, int rank, int size, TextWriter warn)
    {
        _address = address;
        _client = new CoordinatorClient(address, token);
        _rank = rank;
        _warn = warn;
        try
        {
            _client.Register(new RegisterRequest { Rank = rank, Size = size, Host = Environment.MachineName, Pid = Environment.ProcessId }, TimeSpan.FromSeconds(5));
        }
        catch (RpcException e)
        {
            Warn(e);
        }
        _thread = new Thread(Loop) { IsBackground = true, Name = "dsattn heartbeat" };
        _thread.Start();
    }

    /// <summary>Registers (waiting at most 5 s) and starts the heartbeats.</summary>
    /// <param name="address">host:port of the coordinator.</param>
    /// <param name="token">The job token.</param>
    /// <param name="rank">This rank.</param>
    /// <param name="size">Ranks in the job.</param>
    /// <param name="warn">Where the one warning goes (default standard error).</param>
    public static RankReporter Start(string address, string token, int rank, int size, TextWriter? warn = null) =>
        new(address, token, rank, size, warn ?? Console.Error);

    /// <summary>Whether this rank warned that the coordinator is unreachable.</summary>
    public bool Degraded => _warned;

    private void Loop()
    {
        while (!_stop.Wait(Interval))
        {
            try
            {
                Send(RankActivity.Phase);
                _failures = 0;
            }
            catch (RpcException e)
            {
                if (++_failures >= 2) Warn(e);
            }
        }
    }

    private void Send(string phase)
    {
        var c = CollectiveProbe.Snapshot();
        _client.Heartbeat(new HeartbeatRequest
        {
            Rank = _rank,
            Phase = phase,
            Progress = RankActivity.Progress,
            SentUnixMs = CollectiveProbe.NowUnixMs,
            Last = new Collective { Op = c.Op?.ToString() ?? "", Sequence = c.Sequence, Bytes = c.Bytes, EnteredUnixMs = c.EnteredUnixMs, LeftUnixMs = c.LeftUnixMs },
        }, TimeSpan.FromSeconds(2));
    }

    private void Warn(RpcException e)
    {
        if (_warned) return;
        _warned = true;
        lock (_warn) _warn.WriteLine($"rank {_rank}: warning: the control-plane coordinator at {_address} is unreachable ({e.StatusCode}: {e.Status.Detail}); hang detection is off, the job goes on.");
    }

    /// <summary>Stops the heartbeats after a last one that says the rank is done (errors ignored).</summary>
    public void Dispose()
    {
        _stop.Set();
        _thread.Join();
        try { if (!_warned) Send("done"); } catch (RpcException) { }
        _client.Dispose();
        _stop.Dispose();
    }
}
