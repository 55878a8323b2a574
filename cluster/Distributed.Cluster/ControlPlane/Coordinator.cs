using System.Net;
using System.Security.Cryptography;
using System.Text;
using Distributed.Cluster.ControlPlane.Protocol;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Distributed.Cluster.ControlPlane;

/// <summary>What a <see cref="Coordinator"/> needs.</summary>
public sealed record CoordinatorOptions
{
    /// <summary>Ranks in the job.</summary>
    public required int Size { get; init; }

    /// <summary>The address to listen on: 127.0.0.1 (the default, this host only) or e.g. 0.0.0.0 for ranks on other hosts.</summary>
    public string Bind { get; init; } = "127.0.0.1";

    /// <summary>Port to listen on; 0 (the default) picks a free one.</summary>
    public int Port { get; init; }

    /// <summary>The job token every call must carry; null draws a fresh random one.</summary>
    public string? Token { get; init; }

    /// <summary>How long ranks may wait inside a collective that another rank never entered (default 300 s).</summary>
    public TimeSpan HangTimeout { get; init; } = TimeSpan.FromSeconds(300);

    /// <summary>How long a registered rank may send no heartbeat (default: the hang timeout, at most 60 s).</summary>
    public TimeSpan? SilenceTimeout { get; init; }

    /// <summary>Called once, on a thread of its own, with the watchdog's report when it finds a hang; it
    /// should end the job. Null: the report is only kept (<see cref="Coordinator.Verdict"/>).</summary>
    public Action<string>? OnHang { get; init; }

    /// <summary>Where the coordinator logs refused calls (never the token); default standard error.</summary>
    public TextWriter? Log { get; init; }
}

/// <summary>
/// The control plane's server: gRPC over HTTP/2 without TLS (Kestrel), bound to loopback on a free port
/// by default. Every call must carry the job token in the <c>x-dsattn-token</c> header, else it fails with
/// PermissionDenied (logged without the token). It keeps every rank's latest heartbeat, answers status
/// queries, and runs the watchdog (<see cref="CoordinatorOptions.HangTimeout"/>) twice a second. No call can
/// end the job; only the watchdog's report does, through <see cref="CoordinatorOptions.OnHang"/>.
/// </summary>
public sealed class Coordinator : IDisposable
{
    /// <summary>The metadata header that carries the job token.</summary>
    public const string TokenHeader = "x-dsattn-token";

    private readonly WebApplication _app;
    private readonly CoordinatorState _state;
    private readonly Timer _watchdog;
    private readonly CoordinatorOptions _options;
    private int _fired;

    private Coordinator(WebApplication app, CoordinatorState state, CoordinatorOptions options, string token, string address)
    {
        _app = app;
        _state = state;
        _options = options;
        Token = token;
        Address = address;
        _watchdog = new Timer(_ => Watch(), null, 500, 500);
    }

    /// <summary>host:port where the ranks reach it (the bind address, or this host's name when bound to all addresses).</summary>
    public string Address { get; }

    /// <summary>The port it listens on.</summary>
    public int Port => int.Parse(Address[(Address.LastIndexOf(':') + 1)..], System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>The job token (keep it out of logs).</summary>
    public string Token { get; }

    /// <summary>The watchdog's report once it found a hang; empty before.</summary>
    public string Verdict => _state.Verdict;

    /// <summary>A fresh random token: 32 hex digits.</summary>
    public static string NewToken() => Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(16));

    /// <summary>Starts listening; returns once the port is bound.</summary>
    /// <exception cref="IOException">The address cannot be bound.</exception>
    public static Coordinator Start(CoordinatorOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.Size < 1) throw new ArgumentOutOfRangeException(nameof(options), options.Size, "Size must be at least 1.");
        var ip = IPAddress.Parse(options.Bind);
        string token = options.Token ?? NewToken();
        var state = new CoordinatorState(options.Size);
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [], ContentRootPath = AppContext.BaseDirectory });
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(ip, options.Port, o => o.Protocols = HttpProtocols.Http2));
        builder.Services.AddSingleton(state);
        builder.Services.AddSingleton(new TokenCheck(token, options.Log ?? Console.Error));
        builder.Services.AddGrpc(o => o.Interceptors.Add<TokenInterceptor>());
        var app = builder.Build();
        app.MapGrpcService<CoordinatorService>();
        app.StartAsync().GetAwaiter().GetResult();
        string bound = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
        int port = new Uri(bound).Port;
        string host = ip.Equals(IPAddress.Any) || ip.Equals(IPAddress.IPv6Any) ? Dns.GetHostName()
            : ip.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 ? $"[{ip}]" : ip.ToString();
        return new Coordinator(app, state, options, token, $"{host}:{port}");
    }

    /// <summary>Every rank's latest state now (what <c>GetStatus</c> answers).</summary>
    internal StatusReply Status() => _state.Snapshot(CollectiveProbe.NowUnixMs);

    /// <summary>Waits up to <paramref name="timeout"/> for every registered rank to report phase done.</summary>
    public void WaitForRanksDone(TimeSpan timeout)
    {
        var until = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < until && Status().Ranks.Any(r => r.Registered && r.Phase != "done")) Thread.Sleep(50);
    }

    private void Watch()
    {
        if (Volatile.Read(ref _fired) != 0) return;
        var silence = _options.SilenceTimeout ?? TimeSpan.FromSeconds(Math.Min(_options.HangTimeout.TotalSeconds, 60));
        string? report;
        try { report = Watchdog.Check(Status(), _options.HangTimeout, silence); }
        catch (InvalidOperationException) { return; }
        if (report is null || Interlocked.Exchange(ref _fired, 1) != 0) return;
        _state.Verdict = report;
        if (_options.OnHang is { } onHang) new Thread(() => onHang(report)) { IsBackground = true, Name = "dsattn watchdog" }.Start();
    }

    /// <summary>Stops the watchdog and the server.</summary>
    public void Dispose()
    {
        _watchdog.Dispose();
        try { _app.StopAsync().Wait(TimeSpan.FromSeconds(2)); } catch (AggregateException) { }
        ((IDisposable)_app).Dispose();
    }

    internal sealed class TokenCheck(string token, TextWriter log)
    {
        private readonly byte[] _token = Encoding.UTF8.GetBytes(token);

        public void Check(ServerCallContext context)
        {
            string? given = context.RequestHeaders.GetValue(TokenHeader);
            if (given is not null && CryptographicOperations.FixedTimeEquals(Encoding.UTF8.GetBytes(given), _token)) return;
            string why = given is null ? "no token" : "wrong token";
            lock (log) log.WriteLine($"dsattn coordinator: refused {context.Method} from {context.Peer}: {why}");
            throw new RpcException(new Grpc.Core.Status(StatusCode.PermissionDenied, $"{why} ({TokenHeader})"));
        }
    }

    internal sealed class TokenInterceptor(TokenCheck check) : Interceptor
    {
        public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
        {
            check.Check(context);
            return continuation(request, context);
        }

        public override Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation)
        {
            check.Check(context);
            return continuation(requestStream, context);
        }
    }

    internal sealed class CoordinatorService(CoordinatorState state) : Protocol.Coordinator.CoordinatorBase
    {
        public override Task<RegisterReply> Register(RegisterRequest request, ServerCallContext context)
        {
            state.Register(request, CollectiveProbe.NowUnixMs);
            return Task.FromResult(new RegisterReply { HeartbeatIntervalMs = 1000 });
        }

        public override Task<HeartbeatReply> Heartbeat(HeartbeatRequest request, ServerCallContext context)
        {
            state.Heartbeat(request, CollectiveProbe.NowUnixMs);
            return Task.FromResult(new HeartbeatReply());
        }

        public override Task<StatusReply> GetStatus(StatusRequest request, ServerCallContext context) =>
            Task.FromResult(state.Snapshot(CollectiveProbe.NowUnixMs));
    }
}
