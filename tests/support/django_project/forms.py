from __future__ import annotations

from django import forms

from .models import Document, RemoteDocument


class DocumentForm(forms.ModelForm):
    class Meta:
        model = Document
        fields = ["title", "photo", "attachment"]


class RemoteDocumentForm(forms.ModelForm):
    class Meta:
        model = RemoteDocument
        fields = ["photo"]
