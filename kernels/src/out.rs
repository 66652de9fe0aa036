//! An output buffer shared by parallel tasks that each write their own disjoint cells.

/// A raw output pointer; every task using it must write only cells no other task writes.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);

// SAFETY: tasks write disjoint cells of a buffer that outlives the parallel loop.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The cell at `i` (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
