//! Extracts: the passages the LLM builders send, one request each. Chunks are used as
//! they are; documents are re-split into sentence-packed extracts of 1000-2000
//! characters, as the reference design does for its generation prompts.

use unicode_segmentation::UnicodeSegmentation;

use crate::chunk::Chunk;
use crate::documents::Document;

/// One passage.
#[derive(Clone, Debug, PartialEq)]
pub struct Extract {
    /// Chunk id, or document id + `#n`.
    pub id: String,
    /// Category of the source.
    pub category: String,
    /// The text.
    pub text: String,
}

/// Extracts from chunks: one per chunk.
pub fn from_chunks(chunks: &[Chunk]) -> Vec<Extract> {
    chunks
        .iter()
        .map(|c| Extract {
            id: c.id.clone(),
            category: c.category.as_str().to_string(),
            text: c.text.clone(),
        })
        .collect()
}

/// Extracts from documents: sentences packed up to `max_chars`; an extract closes once it
/// reaches `min_chars` and the next sentence would overflow. A sentence longer than
/// `max_chars` is its own extract.
pub fn from_documents(docs: &[Document], min_chars: usize, max_chars: usize) -> Vec<Extract> {
    let mut out = Vec::new();
    for doc in docs {
        let mut current = String::new();
        let mut n = 0;
        let mut push = |text: &mut String, out: &mut Vec<Extract>| {
            let t = text.trim();
            if !t.is_empty() {
                n += 1;
                out.push(Extract {
                    id: format!("{}#{n}", doc.id),
                    category: doc.category.as_str().to_string(),
                    text: t.to_string(),
                });
            }
            text.clear();
        };
        for sentence in doc.content.split_sentence_bounds() {
            let len = current.chars().count();
            let add = sentence.chars().count();
            if len >= min_chars && len + add > max_chars {
                push(&mut current, &mut out);
            }
            current.push_str(sentence);
        }
        push(&mut current, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::documents::Category;

    #[test]
    fn documents_pack_sentences_between_the_bounds() {
        let sentence = "Bread rises when yeast ferments the sugars in flour. ";
        let content = sentence.repeat(100);
        let doc = Document {
            id: "d".into(),
            url: "file:///d".into(),
            category: Category::Article,
            title: None,
            author: None,
            published: None,
            content: content.clone(),
            fetched_at: String::new(),
            metadata: Default::default(),
        };
        let extracts = from_documents(&[doc], 1000, 2000);
        assert!(extracts.len() >= 3);
        for e in &extracts[..extracts.len() - 1] {
            let n = e.text.chars().count();
            assert!((1000..=2000).contains(&n), "{n}");
            assert!(e.text.ends_with('.'));
        }
        let joined: usize = extracts.iter().map(|e| e.text.len() + 1).sum();
        assert_eq!(joined, content.len(), "every sentence lands in one extract");
        assert_eq!(extracts[1].id, "d#2");
    }
}
