//! The step graph: edges from producers to consumers, topological order, the full path of
//! any cycle, and selections (`--only`, `--from`).

use std::collections::{BTreeSet, HashMap};

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};
use petgraph::Direction;

use crate::pipeline::ResolvedStep;

/// A DAG over step indices (positions in the pipeline's step list).
#[derive(Debug)]
pub struct Dag {
    graph: DiGraph<usize, ()>,
    order: Vec<usize>,
}

impl Dag {
    /// Builds the graph. On a cycle, returns the step names along it, in order.
    pub fn build(steps: &[ResolvedStep]) -> Result<Self, Vec<String>> {
        let mut graph = DiGraph::with_capacity(steps.len(), steps.len());
        let nodes: Vec<NodeIndex> = (0..steps.len()).map(|i| graph.add_node(i)).collect();
        let by_name: HashMap<&str, usize> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        for (i, step) in steps.iter().enumerate() {
            let producers: BTreeSet<usize> = step
                .inputs
                .values()
                .filter_map(|b| by_name.get(b.step.as_str()).copied())
                .collect();
            for p in producers {
                graph.add_edge(nodes[p], nodes[i], ());
            }
        }
        match toposort(&graph, None) {
            Ok(order) => Ok(Self {
                order: order.into_iter().map(|n| graph[n]).collect(),
                graph,
            }),
            Err(_) => Err(find_cycle(&graph)
                .into_iter()
                .map(|i| steps[i].name.clone())
                .collect()),
        }
    }

    /// Step indices in a topological order (producers first).
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Direct producers of a step.
    pub fn upstream(&self, step: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(step), Direction::Incoming)
            .map(|n| self.graph[n])
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Direct consumers of a step.
    pub fn downstream(&self, step: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(step), Direction::Outgoing)
            .map(|n| self.graph[n])
            .collect();
        v.sort_unstable();
        v.dedup();
        v
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
    for scc in tarjan_scc(graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
        let start = *scc
            .iter()
            .min_by_key(|n| graph[**n])
            .expect("non-empty scc");
        // Walk inside the component until we return to the start (a shortest-first BFS
        // would also do; any cycle through `start` is a true cycle to show the user).
        let mut path = vec![start];
        let mut visited = BTreeSet::from([start]);
        if extend_to(graph, &members, start, &mut path, &mut visited) {
            return path.into_iter().map(|n| graph[n]).collect();
        }
    }
    Vec::new()
}

fn extend_to(
    graph: &DiGraph<usize, ()>,
    members: &BTreeSet<NodeIndex>,
    start: NodeIndex,
    path: &mut Vec<NodeIndex>,
    visited: &mut BTreeSet<NodeIndex>,
) -> bool {
    let last = *path.last().expect("path starts non-empty");
    let mut next: Vec<NodeIndex> = graph
        .neighbors(last)
        .filter(|n| members.contains(n))
        .collect();
    next.sort_by_key(|n| graph[*n]);
    for n in next {
        if n == start {
            return true;
        }
        if visited.insert(n) {
            path.push(n);
            if extend_to(graph, members, start, path, visited) {
                return true;
            }
            path.pop();
        }
    }
    false
}
