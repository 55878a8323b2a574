using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>
/// Everything the runtime needs to know about one parallel scheme, in one place: its CLI name, the attention
/// kinds it supports, its own validation, its default layout, its memory estimate and how to build it. Each
/// scheme file declares its descriptor next to the scheme, and the <see cref="ParallelScheme"/> member that
/// names the scheme registers it with <see cref="RegisteredSchemeAttribute"/>: a new scheme is one file plus
/// that one line.
/// </summary>
internal abstract class SchemeDescriptor
{
    /// <summary>The name users type: <c>--scheme NAME</c> on the CLI, the <c>scheme</c> key in JSON.</summary>
    public abstract string CliName { get; }

    /// <summary>The attention kinds the scheme runs.</summary>
    public abstract IReadOnlyList<AttentionKind> Kinds { get; }

    /// <summary>One line for help texts.</summary>
    public abstract string Summary { get; }

    /// <summary>Whether the hybrid may run this scheme across its head groups (softmax sequence schemes).</summary>
    public virtual bool HybridSequenceScheme => false;

    /// <summary>The layout used when <see cref="SequenceParallelOptions.Layout"/> is null.</summary>
    public abstract ShardLayout DefaultLayout(SequenceParallelOptions options);

    /// <summary>
    /// Checks that need the scheme (beyond the shared shape and option checks). <paramref name="ranks"/> is P
    /// when known, else 0 (then only rank-independent checks run).
    /// </summary>
    /// <exception cref="ArgumentException">The message names the parameter and the fix.</exception>
    public virtual void Validate(AttentionShape shape, SequenceParallelOptions options, int ranks) { }

    /// <summary>The ranks the sequence is cut over (P, or P / Ph for the hybrid), for the chunk-count check.</summary>
    public virtual int SequenceRanks(AttentionShape shape, SequenceParallelOptions options, int ranks) => ranks;

    /// <summary>What one rank holds, in floats (see <see cref="MemoryEstimate"/>).</summary>
    public abstract MemoryEstimate Estimate(AttentionShape shape, SequenceParallelOptions options, int ranks, ShardLayout layout);

    /// <summary>Builds one instance of the scheme (its buffers are allocated here).</summary>
    public abstract IScheme Create(SchemeSetup setup);
}

/// <summary>What a scheme is built from.</summary>
/// <param name="Communicator">The ranks of the layer.</param>
/// <param name="Backend">The kernels.</param>
/// <param name="Shape">The global shape.</param>
/// <param name="Options">The options (the layout resolved).</param>
/// <param name="Layout">The token layout.</param>
/// <param name="Clock">Compute and communication time.</param>
/// <param name="Shared">Resources shared by every instance of one layer (split communicators), built once.</param>
internal sealed record SchemeSetup(ICommunicator Communicator, IKernelBackend Backend, AttentionShape Shape, SequenceParallelOptions Options,
    ShardLayout Layout, PhaseClock Clock, SharedResources Shared);

/// <summary>
/// Resources that every scheme instance of one layer shares and that must be made collectively once (a
/// communicator split), however many saved contexts are alive.
/// </summary>
internal sealed class SharedResources : IDisposable
{
    private readonly Dictionary<string, object> _items = [];

    /// <summary>The resource named <paramref name="key"/>, made by <paramref name="make"/> the first time.</summary>
    public T Get<T>(string key, Func<T> make) where T : notnull
    {
        lock (_items)
        {
            if (_items.TryGetValue(key, out var found)) return (T)found;
            var made = make();
            _items[key] = made;
            return made;
        }
    }

    /// <summary>Disposes the resources that are disposable.</summary>
    public void Dispose()
    {
        lock (_items)
        {
            foreach (var item in _items.Values) (item as IDisposable)?.Dispose();
            _items.Clear();
        }
    }
}

/// <summary>Marks a <see cref="ParallelScheme"/> member with the descriptor type of the scheme it names.</summary>
/// <param name="descriptor">A <see cref="SchemeDescriptor"/> subclass with a parameterless constructor.</param>
[AttributeUsage(AttributeTargets.Field)]
internal sealed class RegisteredSchemeAttribute(Type descriptor) : Attribute
{
    /// <summary>The descriptor type.</summary>
    public Type Descriptor { get; } = descriptor;
}
