namespace Distributed.Cluster.ControlPlane;

/// <summary>How a job's control plane starts (see <see cref="JobControlPlane.Start"/>).</summary>
public sealed record JobControlPlaneOptions
{
    /// <summary>Address the coordinator binds (default 127.0.0.1: this host only).</summary>
    public string Bind { get; init; } = "127.0.0.1";

    /// <summary>The watchdog's hang timeout.</summary>
    public TimeSpan HangTimeout { get; init; } = TimeSpan.FromSeconds(300);

    /// <summary>Called once on rank 0 with the watchdog's report; it must end the job.</summary>
    public required Action<string> OnHang { get; init; }

    /// <summary>Where rank 0 says where the coordinator is (default standard output).</summary>
    public TextWriter? Out { get; init; }

    /// <summary>Where warnings go (default standard error).</summary>
    public TextWriter? Error { get; init; }
}

/// <summary>
/// A job's control plane on one rank. With <c>DSATTN_COORDINATOR</c> (host:port) and <c>DSATTN_TOKEN</c>
/// in the environment (set by a launcher that hosts the coordinator) every rank reports there. Otherwise
/// rank 0 starts the <see cref="Coordinator"/>, writes the fresh random token to a file only the user can
/// read (mode 0600) and prints the file's path (never the token), and one all-gather over the world
/// communicator (this rank's first collective) hands the address and token to every rank, each
/// character as one float (exact: characters are below 2^16). Each rank then registers and sends
/// heartbeats (<see cref="RankReporter"/>). When the coordinator cannot start or be reached the job
/// goes on without hang detection, after one warning.
/// </summary>
public sealed class JobControlPlane : IDisposable
{
    /// <summary>Floats per rank in the bootstrap exchange (characters of "host:port token").</summary>
    private const int Chars = 256;

    private readonly Coordinator? _coordinator;
    private readonly RankReporter? _reporter;
    private readonly string? _tokenFile;

    private JobControlPlane(Coordinator? coordinator, RankReporter? reporter, string? tokenFile)
    {
        _coordinator = coordinator;
        _reporter = reporter;
        _tokenFile = tokenFile;
    }

    /// <summary>The coordinator hosted on this rank (rank 0), or null.</summary>
    public Coordinator? Coordinator => _coordinator;

    /// <summary>The default token file of a coordinator listening on <paramref name="port"/>.</summary>
    /// <param name="port">The coordinator's port.</param>
    public static string TokenFilePath(int port) =>
        Path.Combine(Path.GetTempPath(), $"dsattn-coordinator-{port.ToString(System.Globalization.CultureInfo.InvariantCulture)}.token");

    /// <summary>Writes <paramref name="token"/> to <paramref name="path"/>, readable and writable by the user only.</summary>
    /// <param name="path">The file.</param>
    /// <param name="token">The token.</param>
    public static void WriteTokenFile(string path, string token)
    {
        File.Delete(path);
        var options = new FileStreamOptions { Mode = FileMode.CreateNew, Access = FileAccess.Write };
        if (!OperatingSystem.IsWindows()) options.UnixCreateMode = UnixFileMode.UserRead | UnixFileMode.UserWrite;
        using var w = new StreamWriter(path, System.Text.Encoding.ASCII, options);
        w.Write(token);
    }

    /// <summary>Starts this rank's side of the control plane; collective over <paramref name="world"/>
    /// unless the environment names the coordinator.</summary>
    /// <param name="world">The world communicator.</param>
    /// <param name="options">Bind address, timeout and what ends the job.</param>
    public static JobControlPlane Start(ICommunicator world, JobControlPlaneOptions options)
    {
        ArgumentNullException.ThrowIfNull(world);
        ArgumentNullException.ThrowIfNull(options);
        var output = options.Out ?? Console.Out;
        var error = options.Error ?? Console.Error;
        string? envAddress = Environment.GetEnvironmentVariable("DSATTN_COORDINATOR");
        string? envToken = Environment.GetEnvironmentVariable("DSATTN_TOKEN");
        if (!string.IsNullOrEmpty(envAddress) && !string.IsNullOrEmpty(envToken))
            return new JobControlPlane(null, RankReporter.Start(envAddress, envToken, world.Rank, world.Size, error), null);

        Coordinator? coordinator = null;
        string? tokenFile = null;
        string message = "";
        if (world.Rank == 0)
        {
            try
            {
                string? file = null;
                coordinator = Coordinator.Start(new CoordinatorOptions
                {
                    Size = world.Size, Bind = options.Bind, HangTimeout = options.HangTimeout, Log = error,
                    // The job is about to be aborted: remove the token file first, nobody else will.
                    OnHang = report =>
                    {
                        if (file is not null) { try { File.Delete(file); } catch (IOException) { } }
                        options.OnHang(report);
                    },
                });
                tokenFile = file = TokenFilePath(coordinator.Port);
                WriteTokenFile(tokenFile, coordinator.Token);
                message = $"{coordinator.Address} {coordinator.Token}";
                output.WriteLine($"control plane: coordinator at {coordinator.Address}, token in {tokenFile} (dsattn status --coordinator {coordinator.Address}), --hang-timeout {options.HangTimeout.TotalSeconds:0.#} s");
            }
            catch (Exception e) when (e is IOException or FormatException or UnauthorizedAccessException or InvalidOperationException or System.Net.Sockets.SocketException)
            {
                coordinator?.Dispose();
                coordinator = null;
                error.WriteLine($"rank 0: warning: the control-plane coordinator did not start on {options.Bind} ({e.GetType().Name}: {e.Message}); hang detection is off, the job goes on.");
            }
        }
        var mine = new float[Chars];
        for (int i = 0; i < Math.Min(Chars, message.Length); i++) mine[i] = message[i];
        var all = new float[Chars * world.Size];
        world.AllGather(mine, all);
        var chars = new char[Chars];
        int n = 0;
        while (n < Chars && all[n] != 0) { chars[n] = (char)all[n]; n++; }
        string agreed = new(chars, 0, n);
        if (agreed.Length == 0) return new JobControlPlane(null, null, null);
        string[] parts = agreed.Split(' ');
        return new JobControlPlane(coordinator, RankReporter.Start(parts[0], parts[1], world.Rank, world.Size, error), tokenFile);
    }

    /// <summary>Sends the last heartbeat (phase done); on rank 0 waits briefly for the others to say done,
    /// then stops the coordinator and removes the token file.</summary>
    public void Dispose()
    {
        _reporter?.Dispose();
        if (_coordinator is not null)
        {
            _coordinator.WaitForRanksDone(TimeSpan.FromSeconds(2));
            _coordinator.Dispose();
        }
        if (_tokenFile is not null)
        {
            try { File.Delete(_tokenFile); } catch (IOException) { }
        }
    }
}
