namespace Distributed.Reference;

/// <summary>Placeholder; the fp64 reference lands here.</summary>
public static class ReferenceAttention { }
