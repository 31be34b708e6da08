//! The step graph (a leaf: it knows indices, not steps): edges from producers to consumers, topological order, the full path of
//! any cycle, and selections (`--only`, `--from`).

use std::collections::BTreeSet;

use petgraph::algo::{kosaraju_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};
use petgraph::Direction;

/// A DAG over node indices `0..n` (the positions of steps in the pipeline's step list).
/// Knows nothing of steps: the pipeline builds it from its input bindings, once.
#[derive(Clone, Debug)]
pub struct Dag {
    graph: DiGraph<usize, ()>,
    order: Vec<usize>,
    upstream: Vec<Vec<usize>>,
    downstream: Vec<Vec<usize>>,
}

impl Dag {
    /// Builds the graph of `n` nodes with `edges` from producer to consumer (duplicates
    /// are fine). On a cycle, returns the nodes along it, in order, starting at the lowest.
    pub fn build(
        n: usize,
        edges: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Self, Vec<usize>> {
        let mut graph = DiGraph::with_capacity(n, n);
        let nodes: Vec<NodeIndex> = (0..n).map(|i| graph.add_node(i)).collect();
        let mut upstream = vec![Vec::new(); n];
        let mut downstream = vec![Vec::new(); n];
        let unique: BTreeSet<(usize, usize)> = edges.into_iter().collect();
        for (from, to) in unique {
            graph.add_edge(nodes[from], nodes[to], ());
            upstream[to].push(from);
            downstream[from].push(to);
        }
        for list in &mut upstream {
            list.sort_unstable();
        }
        match toposort(&graph, None) {
            Ok(order) => Ok(Self {
                order: order.into_iter().map(|n| graph[n]).collect(),
                graph,
                upstream,
                downstream,
            }),
            Err(_) => Err(find_cycle(&graph)),
        }
    }

    /// Node indices in a topological order (producers first).
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Direct producers of a node, ascending.
    pub fn upstream(&self, step: usize) -> &[usize] {
        &self.upstream[step]
    }

    /// Direct consumers of a node, ascending.
    pub fn downstream(&self, step: usize) -> &[usize] {
        &self.downstream[step]
    }

    /// A step and everything below it.
    pub fn descendants(&self, step: usize) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        let mut dfs = Dfs::new(&self.graph, NodeIndex::new(step));
        while let Some(n) = dfs.next(&self.graph) {
            out.insert(self.graph[n]);
        }
        out
    }

    /// A step and everything above it.
    pub fn ancestors(&self, step: usize) -> BTreeSet<usize> {
        let reversed = Reversed(&self.graph);
        let mut out = BTreeSet::new();
        let mut dfs = Dfs::new(reversed, NodeIndex::new(step));
        while let Some(n) = dfs.next(reversed) {
            out.insert(self.graph[n]);
        }
        out
    }
}

impl Dag {
    /// The given steps and everything above any of them (one traversal).
    pub fn ancestors_of_all(&self, steps: &BTreeSet<usize>) -> BTreeSet<usize> {
        let mut seen: BTreeSet<usize> = BTreeSet::new();
        let mut stack: Vec<usize> = steps.iter().copied().collect();
        while let Some(i) = stack.pop() {
            if seen.insert(i) {
                stack.extend(
                    self.graph
                        .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
                        .map(|n| self.graph[n])
                        .filter(|u| !seen.contains(u)),
                );
            }
        }
        seen
    }
}

/// One cycle, as node weights in order, starting at its lowest step index.
fn find_cycle(graph: &DiGraph<usize, ()>) -> Vec<usize> {
    for scc in kosaraju_scc(graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
        let start = *scc
            .iter()
            .min_by_key(|n| graph[**n])
            .expect("non-empty scc");
        // Depth-first walk inside the component until an edge returns to the start; an
        // explicit stack, so even a cycle through thousands of steps cannot overflow.
        let mut path = vec![start];
        let mut visited = BTreeSet::from([start]);
        let mut frontier: Vec<Vec<NodeIndex>> = vec![next_in(graph, &members, start)];
        while let Some(options) = frontier.last_mut() {
            match options.pop() {
                Some(n) if n == start => return path.into_iter().map(|n| graph[n]).collect(),
                Some(n) => {
                    if visited.insert(n) {
                        path.push(n);
                        frontier.push(next_in(graph, &members, n));
                    }
                }
                None => {
                    frontier.pop();
                    path.pop();
                }
            }
        }
    }
    Vec::new()
}

/// Successors of `n` inside the component, lowest step index last (popped first).
fn next_in(
    graph: &DiGraph<usize, ()>,
    members: &BTreeSet<NodeIndex>,
    n: NodeIndex,
) -> Vec<NodeIndex> {
    let mut next: Vec<NodeIndex> = graph.neighbors(n).filter(|m| members.contains(m)).collect();
    next.sort_by_key(|m| std::cmp::Reverse(graph[*m]));
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_and_selects() {
        let dag = Dag::build(3, [(0, 1), (1, 2), (0, 1)]).unwrap();
        assert_eq!(dag.order(), [0, 1, 2]);
        assert_eq!(dag.upstream(1), [0]);
        assert_eq!(dag.downstream(0), [1]);
        assert_eq!(dag.descendants(1), BTreeSet::from([1, 2]));
        assert_eq!(
            dag.ancestors_of_all(&BTreeSet::from([2])),
            BTreeSet::from([0, 1, 2])
        );
    }

    #[test]
    fn names_a_self_loop() {
        assert_eq!(Dag::build(2, [(1, 1)]).unwrap_err(), [1]);
    }

    #[test]
    fn regression_a_huge_cycle_does_not_overflow_the_stack() {
        let n = 100_000;
        let cycle = Dag::build(n, (0..n).map(|i| ((i + n - 1) % n, i))).unwrap_err();
        assert_eq!(cycle.len(), n);
        assert_eq!(cycle[0], 0);
        assert_eq!(cycle[1], 1);
    }
}
