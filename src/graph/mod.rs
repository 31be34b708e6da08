//! The step graph: edges from producers to consumers, topological order, the full path of
//! any cycle, and selections (`--only`, `--from`).

use std::collections::{BTreeSet, HashMap};

use petgraph::algo::{kosaraju_scc, toposort};
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
    use crate::pipeline::InputBinding;

    fn step(name: &str, input_from: Option<&str>) -> ResolvedStep {
        ResolvedStep {
            name: name.into(),
            uses: "command".into(),
            implementation: crate::steps::lookup("command").unwrap(),
            version: "1".into(),
            params: serde_json::json!({"run": "true"}),
            param_refs: Default::default(),
            param_env: Default::default(),
            inputs: input_from
                .map(|p| {
                    indexmap::IndexMap::from([(
                        "in".to_string(),
                        InputBinding {
                            step: p.into(),
                            output: "out".into(),
                        },
                    )])
                })
                .unwrap_or_default(),
            outputs: indexmap::IndexMap::from([("out".to_string(), "file".to_string())]),
        }
    }

    #[test]
    fn orders_and_selects() {
        let steps = vec![step("a", None), step("b", Some("a")), step("c", Some("b"))];
        let dag = Dag::build(&steps).unwrap();
        assert_eq!(dag.order(), [0, 1, 2]);
        assert_eq!(dag.descendants(1), BTreeSet::from([1, 2]));
        assert_eq!(
            dag.ancestors_of_all(&BTreeSet::from([2])),
            BTreeSet::from([0, 1, 2])
        );
    }

    #[test]
    fn regression_a_huge_cycle_does_not_overflow_the_stack() {
        let n = 100_000;
        let steps: Vec<ResolvedStep> = (0..n)
            .map(|i| step(&format!("s{i}"), Some(&format!("s{}", (i + n - 1) % n))))
            .collect();
        let cycle = Dag::build(&steps).unwrap_err();
        assert_eq!(cycle.len(), n);
        assert_eq!(cycle[0], "s0");
        assert_eq!(cycle[1], "s1");
    }
}
