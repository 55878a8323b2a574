using System.Runtime.CompilerServices;

// The CPU accelerator emits its kernel tasks into a dynamic assembly named ILGPURuntime; it must see the
// internal parameter structs of the kernels.
[assembly: InternalsVisibleTo("ILGPURuntime")]
