//! The evaluation report: metrics per model, the judge prompt and its parsing, and a
//! self-contained HTML page (tables, an inline SVG chart of the training curve, samples).

use serde_json::{json, Value};

/// The judge prompt of the reference design (accuracy and style, 1-3 each, JSON).
pub const JUDGE_PROMPT: &str = r#"You are an expert judge. Please evaluate the quality of a given answer to an instruction based on two criteria:
1. Accuracy: How factually correct is the information presented in the answer? You are a technical expert in this topic.
2. Style: Is the tone and writing style appropriate for a blog post or social media content? It should use simple but technical words and avoid formal or academic language.

Accuracy scale:
1 (Poor): Contains factual errors or misleading information
2 (Good): Mostly accurate with minor errors or omissions
3 (Excellent): Highly accurate and comprehensive

Style scale:
1 (Poor): Too formal, uses some overly complex words
2 (Good): Good balance of technical content and accessibility, but still uses formal words and expressions
3 (Excellent): Perfectly accessible language for blog/social media, uses simple but precise technical terms when necessary

Example of bad style: The Llama2 7B model constitutes a noteworthy progression in the field of artificial intelligence, serving as the successor to its predecessor, the original Llama architecture.
Example of excellent style: Llama2 7B outperforms the original Llama model across multiple benchmarks.

Instruction: {instruction}

Answer: {answer}

Provide your evaluation in JSON format with the following structure:
{
    "accuracy": {
        "analysis": "...",
        "score": 0
    },
    "style": {
        "analysis": "...",
        "score": 0
    }
}"#;

/// Fills the judge prompt.
pub fn judge_prompt(template: &str, instruction: &str, answer: &str) -> String {
    template
        .replace("{instruction}", instruction)
        .replace("{answer}", answer)
}

/// A judge verdict: (accuracy, style, reasons).
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// 1-3.
    pub accuracy: u8,
    /// 1-3.
    pub style: u8,
    /// The judge's analyses.
    pub accuracy_reason: String,
    /// The judge's analyses.
    pub style_reason: String,
}

/// The JSON object of an LLM judge's reply, fenced in a code block or not.
pub fn judge_json(reply: &str) -> Result<Value, String> {
    let text = reply.trim();
    let text = text
        .strip_prefix("```json")
        .or_else(|| text.strip_prefix("```"))
        .map(|t| t.trim_end().trim_end_matches("```"))
        .unwrap_or(text);
    serde_json::from_str(text.trim()).map_err(|e| format!("not JSON: {e}"))
}

/// Parses a judge reply; `Err` says why it is unusable.
pub fn parse_verdict(reply: &str) -> Result<Verdict, String> {
    let v = judge_json(reply)?;
    let score = |key: &str| -> Result<(u8, String), String> {
        let s = v[key]["score"]
            .as_f64()
            .ok_or_else(|| format!("no {key}.score"))?;
        if !(1.0..=3.0).contains(&s) || s.fract() != 0.0 {
            return Err(format!("{key}.score {s} is not 1, 2 or 3"));
        }
        Ok((
            s as u8,
            v[key]["analysis"].as_str().unwrap_or_default().to_string(),
        ))
    };
    let (accuracy, accuracy_reason) = score("accuracy")?;
    let (style, style_reason) = score("style")?;
    Ok(Verdict {
        accuracy,
        style,
        accuracy_reason,
        style_reason,
    })
}

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{f:.4}"),
            _ => n.to_string(),
        },
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An SVG line chart of `series` (name, points) over training steps.
pub fn svg_chart(title: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    svg_chart_over(title, "step", series)
}

/// An SVG line chart of `series` (name, points) over `x_label` (step, k...).
pub fn svg_chart_over(title: &str, x_label: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let (w, h, pad) = (640.0, 260.0, 40.0);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .filter(|(_, y)| y.is_finite())
        .collect();
    if all.is_empty() {
        return String::new();
    }
    let (x0, x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    let (y0, y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| {
        (a.min(*y), b.max(*y))
    });
    let sx = |x: f64| pad + (x - x0) / (x1 - x0).max(1e-12) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y0) / (y1 - y0).max(1e-12) * (h - 2.0 * pad);
    let colors = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{t}\"><text x=\"{pad}\" y=\"20\" font-size=\"14\">{t}</text>\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#999\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"#999\"/>\
         <text x=\"2\" y=\"{ty}\" font-size=\"10\">{y1:.3}</text><text x=\"2\" y=\"{b}\" font-size=\"10\">{y0:.3}</text>\
         <text x=\"{pad}\" y=\"{lx}\" font-size=\"10\">{xl} {x0}</text><text x=\"{rx}\" y=\"{lx}\" font-size=\"10\">{x1}</text>",
        t = esc(title), xl = esc(x_label), b = h - pad, r = w - pad, ty = pad + 4.0, lx = h - pad + 14.0, rx = w - pad - 20.0
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let path: Vec<String> = points
            .iter()
            .filter(|(_, y)| y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"{color}\">{}</text>",
            path.join(" "), w - pad - 120.0, pad + 14.0 * i as f64, esc(name)
        ));
    }
    out.push_str("</svg>");
    out
}

/// Points of `key` from a metadata curve (`[{step, key...}]`).
pub fn curve_points(curve: &Value, key: &str) -> Vec<(f64, f64)> {
    curve
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p["step"].as_f64()?, p[key].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The HTML page: `metrics` = {"model": {...}, "baseline": {...}}, `samples` = records.
pub fn html(title: &str, metrics: &Value, curve: &Value, samples: &[Value]) -> String {
    let models: Vec<(&String, &Value)> = metrics["models"]
        .as_object()
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    let mut keys: Vec<String> = Vec::new();
    for (_, m) in &models {
        for k in m.as_object().into_iter().flatten().map(|(k, _)| k) {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let mut table = String::from("<table><tr><th>metric</th>");
    for (name, _) in &models {
        table.push_str(&format!("<th>{}</th>", esc(name)));
    }
    table.push_str("</tr>");
    for k in &keys {
        table.push_str(&format!("<tr><td>{}</td>", esc(k)));
        for (_, m) in &models {
            table.push_str(&format!("<td>{}</td>", esc(&fmt(&m[k]))));
        }
        table.push_str("</tr>");
    }
    table.push_str("</table>");
    let chart = svg_chart(
        "training loss",
        &[
            ("loss", curve_points(curve, "loss")),
            ("eval_loss", curve_points(curve, "eval_loss")),
        ],
    );
    let lr_chart = svg_chart("learning rate", &[("lr", curve_points(curve, "lr"))]);
    let mut rows = String::from("<table><tr><th>model</th><th>kind</th><th>prompt</th><th>reference</th><th>output</th><th>ROUGE-L</th><th>judge</th></tr>");
    for s in samples {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&fmt(&s["model"])), esc(&fmt(&s["kind"])), esc(&fmt(&s["prompt"])), esc(&fmt(&s["reference"])),
            esc(&fmt(&s["output"])), esc(&fmt(&s["rouge_l"])),
            esc(&s.get("judge").filter(|j| !j.is_null()).map(|j| format!("accuracy {} / style {}: {}", fmt(&j["accuracy"]), fmt(&j["style"]), fmt(&j["accuracy_reason"]))).unwrap_or_default())
        ));
    }
    rows.push_str("</table>");
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}}th{{background:#f5f5f5}}</style></head>\
         <body><h1>{t}</h1><h2>Metrics</h2>{table}<h2>Training</h2>{chart}{lr_chart}<h2>Generations</h2>{rows}</body></html>\n",
        t = esc(title)
    )
}

/// Mean of some numbers (None when empty).
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Rounds for display in metadata.
pub fn round4(v: Option<f64>) -> Value {
    v.map(|x| json!((x * 10000.0).round() / 10000.0))
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_parse_and_reject_out_of_range_scores() {
        let ok = r#"```json
{"accuracy": {"analysis": "right", "score": 3}, "style": {"analysis": "stiff", "score": 1}}
```"#;
        let v = parse_verdict(ok).unwrap();
        assert_eq!((v.accuracy, v.style), (3, 1));
        assert_eq!(v.accuracy_reason, "right");
        assert!(
            parse_verdict(r#"{"accuracy": {"score": 4}, "style": {"score": 1}}"#)
                .unwrap_err()
                .contains("accuracy.score 4")
        );
        assert!(parse_verdict("great answer!").is_err());
    }

    #[test]
    fn html_escapes_and_embeds_the_chart() {
        let metrics =
            json!({"models": {"model": {"perplexity": 3.5}, "baseline": {"perplexity": 9.25}}});
        let curve = json!([{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 2, "loss": 1.0, "eval_loss": 1.5, "lr": 0.05}]);
        let page = html(
            "r",
            &metrics,
            &curve,
            &[json!({"model": "model", "kind": "sample", "prompt": "<b>hi</b>", "output": "x"})],
        );
        assert!(page.contains("&lt;b&gt;hi&lt;/b&gt;"));
        assert!(page.contains("<svg") && page.contains("<polyline"));
        assert!(page.contains("<td>3.5000</td><td>9.2500</td>"));
        assert!(!page.contains("http://") || page.contains("http://www.w3.org/2000/svg"));
    }
}
