using System.Globalization;
using System.Net;
using System.Net.NetworkInformation;
using System.Net.Sockets;

namespace Distributed.Cluster;

/// <summary>A hostfile host that cannot take ranks, with why and how to fix it.</summary>
/// <param name="Entry">The hostfile line.</param>
/// <param name="Reason">What failed: the name lookup or the port probe, in words.</param>
/// <param name="Fix">What to do about it.</param>
public sealed record UnreachableHost(HostfileEntry Entry, string Reason, string Fix);

/// <summary>
/// Checks, before <c>mpiexec</c> starts, that every host of a hostfile can take ranks: its name resolves, and a
/// TCP connection to the port hydra's launcher uses (ssh, port 22, by default) is answered. Without this, hydra
/// starts the ranks on the hosts it can reach, and those wait in <c>MPI_Init</c> for the ranks that never start
/// (or ssh waits minutes for its own timeout). Hosts that are this machine (localhost, 127.x, ::1, its own names
/// and addresses) are not probed: hydra starts their ranks without ssh.
/// </summary>
public static class HostReachability
{
    /// <summary>ssh's port: hydra's default launcher connects here to start its proxy on each host.</summary>
    public const int SshPort = 22;

    /// <summary>rsh's port, for <c>HYDRA_LAUNCHER=rsh</c>.</summary>
    public const int RshPort = 514;

    /// <summary>
    /// The port hydra's launcher connects to, from <c>HYDRA_LAUNCHER</c> (read through <paramref name="get"/>):
    /// ssh (the default) 22, rsh 514; null when the launcher does not connect to the hosts itself (slurm, pbs,
    /// lsf, sge, ll, fork, manual), where a probe would refuse jobs that work.
    /// </summary>
    /// <returns>The port (or null) and the launcher's name, for messages.</returns>
    public static (int? Port, string Launcher) LauncherPort(Func<string, string?> get)
    {
        ArgumentNullException.ThrowIfNull(get);
        string launcher = (get("HYDRA_LAUNCHER") ?? "ssh").Trim().ToLowerInvariant();
        return launcher switch
        {
            "" or "ssh" => (SshPort, "ssh"),
            "rsh" => (RshPort, "rsh"),
            _ => (null, launcher),
        };
    }

    /// <summary>
    /// True when <paramref name="host"/> names this machine without a lookup: localhost, a loopback address
    /// (127.x, ::1), this machine's host name, or one of its interface addresses.
    /// </summary>
    public static bool IsLocalName(string host)
    {
        ArgumentNullException.ThrowIfNull(host);
        if (host.Equals("localhost", StringComparison.OrdinalIgnoreCase) || host.EndsWith(".localhost", StringComparison.OrdinalIgnoreCase)) return true;
        if (host.Equals(Environment.MachineName, StringComparison.OrdinalIgnoreCase) || host.Equals(SafeHostName(), StringComparison.OrdinalIgnoreCase)) return true;
        return IPAddress.TryParse(host, out var address) && IsLocalAddress(address);
    }

    /// <summary>True for a loopback address or an address of one of this machine's interfaces.</summary>
    public static bool IsLocalAddress(IPAddress address)
    {
        ArgumentNullException.ThrowIfNull(address);
        if (IPAddress.IsLoopback(address)) return true;
        if (address.IsIPv4MappedToIPv6) address = address.MapToIPv4();
        return LocalAddresses.Value.Contains(address);
    }

    private static readonly Lazy<HashSet<IPAddress>> LocalAddresses = new(() =>
    {
        var set = new HashSet<IPAddress>();
        try
        {
            foreach (var nic in NetworkInterface.GetAllNetworkInterfaces())
                foreach (var a in nic.GetIPProperties().UnicastAddresses)
                    set.Add(a.Address);
        }
        catch (NetworkInformationException) { } // no interface list: only loopback counts as local
        return set;
    });

    private static string SafeHostName()
    {
        try { return Dns.GetHostName(); }
        catch (SocketException) { return Environment.MachineName; }
    }

    /// <summary>
    /// The hosts of <paramref name="hostfile"/> that cannot take ranks, in file order, all checked in parallel:
    /// a name that does not resolve within <paramref name="timeout"/>, or (when <paramref name="port"/> is set) a
    /// non-local host whose <paramref name="port"/> does not accept a TCP connection within <paramref name="timeout"/>.
    /// The whole check takes at most about twice <paramref name="timeout"/>.
    /// </summary>
    /// <param name="hostfile">The parsed hostfile.</param>
    /// <param name="port">TCP port to probe on each non-local host (1 to 65535), or null to resolve names only.</param>
    /// <param name="timeout">Limit of each host's name lookup, and of its port probe.</param>
    /// <param name="launcher">The launcher's name that uses <paramref name="port"/>, for messages (e.g. "ssh").</param>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="port"/> is outside 1 to 65535, or
    /// <paramref name="timeout"/> is not positive.</exception>
    public static IReadOnlyList<UnreachableHost> Find(Hostfile hostfile, int? port, TimeSpan timeout, string launcher = "ssh")
    {
        ArgumentNullException.ThrowIfNull(hostfile);
        if (port is < 1 or > 65535) throw new ArgumentOutOfRangeException(nameof(port), port, "The port to probe must be 1 to 65535 (or none).");
        if (timeout <= TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(timeout), timeout, "The host check's timeout must be positive.");
        var checks = hostfile.Entries.Select(e => Check(e, port, timeout, launcher)).ToArray();
        Task.WaitAll(checks);
        return [.. checks.Select(c => c.Result).OfType<UnreachableHost>()];
    }

    private static async Task<UnreachableHost?> Check(HostfileEntry entry, int? port, TimeSpan timeout, string launcher)
    {
        if (IsLocalName(entry.Host)) return null;
        string seconds = timeout.TotalSeconds.ToString("0.###", CultureInfo.InvariantCulture);
        const string nameFix = "Fix the name (or add it to /etc/hosts) or remove the line";
        IPAddress[] addresses;
        try
        {
            addresses = await Dns.GetHostAddressesAsync(entry.Host).WaitAsync(timeout).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            return new UnreachableHost(entry, $"the name does not resolve within {seconds} s (the lookup took longer; a slow or unreachable DNS server?)", nameFix);
        }
        catch (Exception e) when (e is SocketException or ArgumentException)
        {
            return new UnreachableHost(entry, $"the name does not resolve ({e.Message})", nameFix);
        }
        if (addresses.Length == 0) return new UnreachableHost(entry, "the name resolves to no address", nameFix);
        if (addresses.Any(IsLocalAddress) || port is null) return null;

        string portFix = $"Check that the host is up and that '{launcher} {entry.Host}' works from here, correct or remove the line, " +
            $"or give --host-check-port (another port to probe; 0 skips the probe)";
        string? failure = null;
        // The first address that answers wins; the reason reported is the last address's.
        var deadline = DateTime.UtcNow + timeout;
        foreach (var address in addresses.OrderBy(a => a.AddressFamily == AddressFamily.InterNetwork ? 0 : 1))
        {
            var left = deadline - DateTime.UtcNow;
            if (left <= TimeSpan.Zero) break;
            failure = await ProbePort(address, port.Value, left, launcher).ConfigureAwait(false);
            if (failure is null) return null;
        }
        return new UnreachableHost(entry, failure ?? $"no answer on TCP port {port} within {seconds} s", portFix);
    }

    /// <summary>
    /// Opens (and closes) a TCP connection to <paramref name="address"/>:<paramref name="port"/>; null when it was
    /// accepted within <paramref name="timeout"/>, otherwise why not, in words.
    /// </summary>
    internal static async Task<string?> ProbePort(IPAddress address, int port, TimeSpan timeout, string launcher)
    {
        string what = $"TCP port {port} ({launcher}, which MPICH's hydra uses to start ranks there)";
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            using var socket = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            await socket.ConnectAsync(address, port, cts.Token).ConfigureAwait(false);
            return null;
        }
        catch (OperationCanceledException)
        {
            return $"no answer from {address} on {what} within {timeout.TotalSeconds.ToString("0.###", CultureInfo.InvariantCulture)} s: the host is down, a firewall drops the connection, or the address is wrong";
        }
        catch (SocketException e)
        {
            return e.SocketErrorCode switch
            {
                SocketError.ConnectionRefused => $"{address} refused a connection on {what}: nothing listens on that port, or a firewall rejects it",
                SocketError.NetworkUnreachable or SocketError.HostUnreachable => $"there is no route to {address} ({what}): {e.Message}",
                _ => $"connecting to {address} on {what} failed: {e.Message}",
            };
        }
    }
}
