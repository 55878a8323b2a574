using System.Reflection;
using Distributed.Schemes;

namespace Distributed;

/// <summary>What a scheme is, as users see it.</summary>
/// <param name="Scheme">The enum member.</param>
/// <param name="Name">The CLI and JSON name (<c>lasp2</c>, <c>allgather</c>, …).</param>
/// <param name="Kinds">The attention kinds it runs.</param>
/// <param name="Summary">One line.</param>
/// <param name="HybridSequenceScheme">Whether the hybrid can run it across head groups.</param>
public sealed record SchemeInfo(ParallelScheme Scheme, string Name, IReadOnlyList<AttentionKind> Kinds, string Summary, bool HybridSequenceScheme);

/// <summary>
/// The registered schemes: every <see cref="ParallelScheme"/> member with its descriptor. Names, supported
/// attention kinds, validation, default layouts and memory estimates all come from here.
/// </summary>
public static class SchemeRegistry
{
    private static readonly Dictionary<ParallelScheme, SchemeDescriptor> Descriptors = Discover();

    /// <summary>Every registered scheme, in enum order.</summary>
    public static IReadOnlyList<SchemeInfo> All { get; } =
        Descriptors.OrderBy(p => p.Key).Select(p => Info(p.Key, p.Value)).ToArray();

    /// <summary>The scheme's public description.</summary>
    public static SchemeInfo Describe(ParallelScheme scheme) => Info(scheme, Get(scheme));

    /// <summary>The scheme whose CLI name is <paramref name="name"/> (case-insensitive).</summary>
    /// <exception cref="ArgumentException">No such scheme; the message lists the names.</exception>
    public static ParallelScheme Parse(string name, string parameter = "scheme")
    {
        foreach (var (scheme, d) in Descriptors)
            if (string.Equals(d.CliName, name, StringComparison.OrdinalIgnoreCase)) return scheme;
        throw new ArgumentException($"Unknown scheme '{name}'; use one of: {string.Join(", ", All.Select(s => s.Name))}.", parameter);
    }

    /// <summary>The CLI names of the schemes that run <paramref name="kind"/>.</summary>
    public static IReadOnlyList<string> NamesFor(AttentionKind kind) => All.Where(s => s.Kinds.Contains(kind)).Select(s => s.Name).ToArray();

    internal static SchemeDescriptor Get(ParallelScheme scheme) =>
        Descriptors.TryGetValue(scheme, out var d) ? d
            : throw new ArgumentException($"Unknown scheme {(int)scheme}; use one of: {string.Join(", ", All.Select(s => s.Scheme))}.", "options");

    private static SchemeInfo Info(ParallelScheme scheme, SchemeDescriptor d) => new(scheme, d.CliName, d.Kinds, d.Summary, d.HybridSequenceScheme);

    private static Dictionary<ParallelScheme, SchemeDescriptor> Discover()
    {
        var found = new Dictionary<ParallelScheme, SchemeDescriptor>();
        foreach (var field in typeof(ParallelScheme).GetFields(BindingFlags.Public | BindingFlags.Static))
        {
            var attribute = field.GetCustomAttribute<RegisteredSchemeAttribute>()
                ?? throw new InvalidOperationException($"ParallelScheme.{field.Name} has no [RegisteredScheme(typeof(...))]: every scheme registers its descriptor.");
            var descriptor = (SchemeDescriptor)Activator.CreateInstance(attribute.Descriptor)!;
            found[(ParallelScheme)field.GetValue(null)!] = descriptor;
        }
        var names = found.Values.GroupBy(d => d.CliName, StringComparer.OrdinalIgnoreCase).FirstOrDefault(g => g.Count() > 1);
        if (names is not null) throw new InvalidOperationException($"Two schemes are named '{names.Key}'.");
        return found;
    }
}
